"""The finetuning recipes load, and their model sections are allowed over MPT-7B / the tiny
demo model (only the changes a finetune may make)."""
import pytest

from mpt_jax.convert.pretrained import merge_finetune_config
from mpt_jax.model.config import MPTConfig


@pytest.mark.parametrize("name,max_seq_len,packed", [
    ("mpt7b_instruct", 2048, False), ("mpt7b_chat", 2048, True),
    ("mpt7b_storywriter", 65536, True)])
def test_mpt7b_recipes(name, max_seq_len, packed):
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config("/ckpt/mpt-7b")
    assert c.train.init_from == "/ckpt/mpt-7b" and c.data.packing == packed
    cfg = merge_finetune_config(MPTConfig.mpt_7b(), c.model.to_dict())
    assert cfg.max_seq_len == c.train.seq_len == max_seq_len
    assert cfg.attn_config.attn_uses_sequence_id == packed
    assert cfg.replace(max_seq_len=2048, attn_config=MPTConfig.mpt_7b().attn_config) == \
        MPTConfig.mpt_7b()


def test_instruct_recipe_numbers():
    from configs import mpt7b_instruct

    c = mpt7b_instruct.get_config()
    assert (c.optim.name, c.optim.lr, c.optim.b2, c.optim.schedule, c.optim.warmup_steps,
            c.optim.alpha_f, c.optim.clip_norm) == ("decoupled_adamw", 5e-6, 0.999, "linear",
                                                    50, 0.0, 1.0)
    assert c.train.global_batch_size == 48 and c.max_steps == 2 * ((59310 - 59310 // 20) // 48)


def test_tiny_sft_over_the_tiny_model():
    from configs import tiny, tiny_sft
    from mpt_jax.train.trainer import model_config

    pretrained = model_config(tiny.get_config(), 4096)
    c = tiny_sft.get_config("runs/tiny")
    cfg = merge_finetune_config(pretrained, c.model.to_dict())
    assert cfg == pretrained.replace(attn_config=pretrained.attn_config.__class__(
        **{**pretrained.attn_config.__dict__, "attn_uses_sequence_id": True}))
    assert c.data.tokenizer == "" and c.train.init_from == "runs/tiny"  # its tokenizer
    assert c.eval.first
    assert c.data.builtin_max_seq_len == c.train.seq_len == 128
