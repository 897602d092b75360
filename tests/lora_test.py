"""LoRA (issue #18): fresh adapters leave the model as it was, merged and unmerged adapters
agree, PEFT loads our exported adapters and we load PEFT's, the trainer trains the adapters
alone (step 0 = the base's loss, optimizer state over the adapters only, the base unchanged),
sharded / accumulated / resumed runs match the plain one, and bad input is one line."""
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, hf_model, make_docs, read_losses, stop_at_check, subprocess_env, tiny
from mpt_jax.model import lora as lora_lib
from mpt_jax.model.config import FFNConfig

T = 32
CFG = tiny(d_model=40, n_heads=4, vocab_size=384, max_seq_len=T)
TARGETS = ("Wqkv", "out_proj", "up_proj", "down_proj")
LORA = lora_lib.LoraConfig(4, 8.0, 0.0, TARGETS)


def _ids(b=2, t=13, seed=0):
    return np.random.RandomState(seed).randint(0, CFG.vocab_size, (b, t)).astype(np.int32)


def _fresh(cfg, lora, seed):
    """A freshly initialised model's params pure dict (numpy), made under one jit."""
    from mpt_jax.model import MPTForCausalLM

    return jax.tree.map(np.asarray, jax.jit(lambda: nnx.to_pure_dict(nnx.state(
        MPTForCausalLM(cfg, rngs=nnx.Rngs(seed), lora=lora), nnx.Param)))())


def _forward(cfg, lora=None):
    """(params pure dict, ids) -> logits, jitted: one compile per model structure."""
    from mpt_jax.model import abstract_model

    @jax.jit
    def run(pure, ids):
        graphdef, state = nnx.split(abstract_model(cfg, lora=lora))
        nnx.replace_by_pure_dict(state, pure)
        return nnx.merge(graphdef, state)(ids)

    return lambda pure, ids: np.asarray(run(pure, ids))


def _with_random_b(pure, seed=1, std=0.3):
    """`pure` with every adapter's B drawn at random (as after training: B starts at zero)."""
    rng = np.random.RandomState(seed)
    adapters, base = lora_lib.split(pure)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: (rng.normal(0, std, x.shape).astype(np.float32)
                      if p[-1].key == "b" else np.asarray(x)), adapters)
    return lora_lib.join(adapters, base)


def _hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny HF MPT directory with a tokenizer, examples shards made with it, and a second
    HF directory of another width (for adapters that do not fit)."""
    from mpt_jax.data import prepare, tokenizer as tokenizer_lib

    root = tmp_path_factory.mktemp("lora")
    docs = make_docs(120, 1, "a", max_words=12)
    rows = [{"prompt": " ".join(d.split()[:2]) + ":",
             "response": " " + " ".join(d.split()[2:] or ["alpha"])} for d in docs]
    tok_path = root / "tokenizer.json"
    tokenizer_lib.train_byte_level_bpe([r["prompt"] + r["response"] for r in rows],
                                       320).save(str(tok_path))
    hf = hf_model(CFG, seed=5, std=0.1)
    hf.save_pretrained(root / "hf")
    shutil.copy(tok_path, root / "hf" / "tokenizer.json")
    hf_model(tiny(d_model=44, n_heads=4, vocab_size=384, max_seq_len=T), seed=6).save_pretrained(
        root / "hf_wide")
    (root / "ex.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare.prepare_dataset([str(root / "ex.jsonl")], str(root / "ex"), str(tok_path),
                            seq_len=None, format="prompt_response", max_seq_len=T,
                            progress=False)
    return root, hf


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fresh_adapters_change_nothing_and_merged_equals_unmerged():
    pure = _fresh(CFG, LORA, 0)
    adapters, plain = lora_lib.split(pure)
    pair = adapters["blocks"]["attn"]["Wqkv_lora"]
    # PEFT's init: A ~ U(+-1/sqrt(in)) (kaiming_uniform a=sqrt(5)), B zero
    assert pair["a"].shape == (CFG.n_layers, CFG.d_model, 4)
    assert 0.8 / np.sqrt(CFG.d_model) < np.abs(pair["a"]).max() <= 1 / np.sqrt(CFG.d_model)
    assert not np.any(pair["b"])
    ids = _ids()
    plain_fn, lora_fn = _forward(CFG), _forward(CFG, LORA)
    want = plain_fn(plain, ids)
    np.testing.assert_array_equal(lora_fn(pure, ids), want)
    trained = _with_random_b(pure)
    unmerged = lora_fn(trained, ids)
    assert np.abs(unmerged - want).max() > 0.1  # (the adapters matter)
    np.testing.assert_allclose(unmerged, plain_fn(lora_lib.merge(trained, LORA), ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_remat_backward_keeps_no_copy_of_the_frozen_weights(scan, capsys):
    """With full remat and a bf16 base, what the backward keeps from the forward is each
    block's input, never a per-layer slice of the stacked weights (a copy of the whole base:
    it cost 12 GiB on MPT-7B)."""
    import jax.numpy as jnp

    from mpt_jax.model import MPTForCausalLM

    model = MPTForCausalLM(CFG, rngs=nnx.Rngs(0), lora=LORA, param_dtype=jnp.bfloat16,
                           dtype=jnp.bfloat16, remat_policy="full", scan_layers=scan)
    graphdef, state = nnx.split(model, nnx.Param)
    adapters, frozen = lora_lib.split(nnx.to_pure_dict(state))
    ids = jnp.asarray(_ids())

    def loss(adapters, frozen):
        nnx.replace_by_pure_dict(state, lora_lib.join(adapters, frozen))
        h, _ = nnx.merge(graphdef, state).hidden_states(ids)
        return jnp.sum(h.astype(jnp.float32))

    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, adapters, frozen)
    saved = [line for line in capsys.readouterr().out.splitlines()
             if line and "from the argument" not in line]
    d, f = CFG.d_model, CFG.d_model * 4
    weights = [f"bf16[{a},{b}]" for a, b in ((d, 3 * d), (d, d), (d, f), (f, d))]
    weights += [w.replace("bf16[", "bf16[1,") for w in weights]
    assert saved and not [line for line in saved if line.split()[0] in weights], saved


def test_gate_proj_adapter_on_a_glu_model_merges():
    cfg = tiny(d_model=40, n_heads=4, vocab_size=384, max_seq_len=T,
               ffn_config=FFNConfig(ffn_type="mptglu"))
    lora = lora_lib.LoraConfig(3, 6.0, 0.0, ("gate_proj", "down_proj"))
    pure = _with_random_b(_fresh(cfg, lora, 1))
    ids = _ids()
    np.testing.assert_allclose(_forward(cfg, lora)(pure, ids),
                               _forward(cfg)(lora_lib.merge(pure, lora), ids),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# PEFT both ways
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_exported_adapters_load_in_peft_with_our_logits(base, tmp_path):
    from peft import PeftModel
    from transformers import MptForCausalLM

    from mpt_jax.convert import lora as lora_io
    from mpt_jax.convert.convert import read_pure

    root, _ = base
    cfg, plain = read_pure(root / "hf")
    adapters = lora_lib.split(_with_random_b(_fresh(cfg, LORA, 2), std=0.1))[0]
    adapted = lora_io.Adapted(cfg, LORA, str(root / "hf"), None, adapters, root / "hf")
    lora_io.export_peft(adapted, tmp_path / "peft")
    meta = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (meta["r"], meta["lora_alpha"], sorted(meta["target_modules"])) == (
        4, 8.0, sorted(TARGETS))
    peft_model = PeftModel.from_pretrained(MptForCausalLM.from_pretrained(root / "hf"),
                                           str(tmp_path / "peft")).eval()
    ids = _ids()
    ours = _forward(cfg, LORA)(lora_lib.join(adapters, plain), ids)
    np.testing.assert_allclose(ours, _hf_logits(peft_model, ids), atol=1e-4, rtol=1e-4)
    plain_logits = _hf_logits(MptForCausalLM.from_pretrained(root / "hf"), ids)
    assert np.abs(ours - plain_logits).max() > 0.05


def _peft_dir(base_dir, dst, targets=TARGETS):
    """An adapter made by peft.get_peft_model on the HF MPT in `base_dir` (B drawn at
    random)."""
    import peft
    import torch
    from transformers import MptForCausalLM

    hf = MptForCausalLM.from_pretrained(base_dir)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=3, lora_alpha=12, target_modules=list(
        targets), lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    pm.save_pretrained(dst)
    return pm.eval()


@pytest.mark.slow
def test_peft_adapter_imports_and_loads_with_peft_logits(base, tmp_path):
    from mpt_jax import load_pretrained
    from mpt_jax.convert import convert

    root, _ = base
    pm = _peft_dir(root / "hf", tmp_path / "peft")
    ids = _ids()
    want = _hf_logits(pm, ids)
    for merge in (True, False):
        got = np.asarray(load_pretrained(tmp_path / "peft", merge_lora=merge)(ids))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert convert.main(["import", str(tmp_path / "peft"), str(tmp_path / "ours")]) == 0
    np.testing.assert_allclose(np.asarray(load_pretrained(tmp_path / "ours")(ids)), want,
                               atol=1e-4, rtol=1e-4)
    assert convert.main(["export", str(tmp_path / "ours"), str(tmp_path / "merged"),
                         "--merge_lora"]) == 0
    from transformers import MptForCausalLM

    merged = MptForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_hf_logits(merged, ids), want, atol=1e-4, rtol=1e-4)


def test_adapter_for_another_base_is_one_line(base, tmp_path, capsys):
    from mpt_jax.convert import convert

    root, _ = base
    _peft_dir(root / "hf", tmp_path / "peft", targets=("Wqkv",))
    capsys.readouterr()  # (transformers' own progress bars)
    assert convert.main(["import", str(tmp_path / "peft"), str(tmp_path / "out"), "--base",
                         str(root / "hf_wide")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the Wqkv adapter's A has shape [2, 40, 3], the base model " \
        "wants [2, 44, 3]" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
def _config_file(path, root, **overrides):
    """A config file over the tiny base and its examples: LoRA rank 4 on four targets, full
    remat."""
    lines = "\n".join(f"    set_key(c, {k!r}, {v!r})" for k, v in overrides.items())
    path.write_text(textwrap.dedent(f'''\
        import ml_collections
        from configs.base import data_section, get_base_config, model_section
        from mpt_jax.convert.pretrained import read_model_config

        def set_key(c, key, value):
            *parents, leaf = key.split(".")
            for p in parents:
                c = c[p]
            c[leaf] = value

        def get_config():
            c = get_base_config("125m")
            c.model = model_section(read_model_config({str(root / "hf")!r}))
            c.seed = 3
            c.max_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 1, 2, 2
            c.train.update(dict(init_from={str(root / "hf")!r}, seq_len={T},
                                global_batch_size=4, micro_batch_size=0,
                                compute_dtype="float32", param_dtype="float32",
                                remat_policy="full", scan_layers=True, attn_impl="reference",
                                loss_chunk_size=8))
            c.train.lora.update(dict(rank=4, alpha=8.0, targets={TARGETS!r}))
            c.optim.update(dict(name="decoupled_lion", lr=3e-3, warmup_steps=0,
                                schedule="constant"))
            c.eval.update(dict(batch_size=4, num_batches=2, first=True))
            c.loss_spike.enabled = False
            c.checkpoint.async_save = False
            c.data = data_section(sources={{"ex": ml_collections.ConfigDict(dict(
                path={str(root / "ex")!r}, weight=1.0))}}, eval_fraction=0.1, prefetch=0)
        ''') + lines + "\n    return c\n")
    return str(path)


def _config(tmp_path, root, **overrides):
    return runpy.run_path(_config_file(tmp_path / "cfg.py", root, **overrides))["get_config"]()


def _hf_masked_nll(hf, batch):
    import torch

    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    with torch.no_grad():
        logits = hf(ids, attention_mask=torch.tensor(batch["segment_ids"])).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).numpy()
    keep = batch["loss_mask"][:, 1:] == 1
    picked = np.take_along_axis(logp, batch["input_ids"][:, 1:, None].astype(np.int64), -1)
    return float(-(picked[..., 0] * keep).sum()), int(keep.sum())


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    from mpt_jax.train import trainer

    root, _ = base
    tmp = tmp_path_factory.mktemp("run")
    config = _config(tmp, root)
    workdir = tmp / "run"
    trainer.train(config, str(workdir))
    return config, workdir


@pytest.mark.slow
def test_lora_run_starts_at_the_base_and_trains_only_adapters(base, lora_run, tmp_path):
    from mpt_jax import load_pretrained
    from mpt_jax.convert import convert
    from mpt_jax.convert.convert import read_pure
    from mpt_jax.data import pipeline as data_lib
    from mpt_jax.model.config import MPTConfig
    from mpt_jax.train import optim as optim_lib, step as step_lib

    root, hf = base
    config, workdir = lora_run
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    (step0,) = [r for r in rows if r["step"] == 0]
    (train1,) = [r for r in rows if r["step"] == 1 and "loss" in r]
    batch = next(data_lib.make_train_iterator(config.data, seq_len=T, batch_size=4,
                                              seed=config.seed, workdir=str(workdir)))
    nll, count = _hf_masked_nll(hf, batch)
    np.testing.assert_allclose(train1["loss"], nll / count, rtol=1e-5)  # step 0 = the base
    sums = [_hf_masked_nll(hf, b) for b in data_lib.make_eval_batches(
        config.data, seq_len=T, batch_size=4, num_batches=2, workdir=str(workdir))]
    np.testing.assert_allclose(step0["eval_loss"], sum(s for s, _ in sums) /
                               sum(c for _, c in sums), rtol=1e-5)
    last = [r for r in rows if r["step"] == 4 and "eval_loss" in r][-1]
    assert last["eval_loss"] < step0["eval_loss"] - 0.05

    # the base is unchanged; the checkpoint holds the adapters, the optimizer state covers them
    ck = workdir / "checkpoints" / "4"
    assert json.loads((ck / "lora" / "lora.json").read_text())["base_fingerprint"]
    unmerged = load_pretrained(workdir, merge_lora=False)
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(unmerged, nnx.Param)))
    adapters, got_base = lora_lib.split(pure)
    _, want_base = read_pure(root / "hf")
    jax.tree.map(np.testing.assert_array_equal, got_base, want_base)
    assert any(np.any(x) for x in jax.tree.leaves(adapters))
    cfg = MPTConfig.from_dict(config.model.to_dict())
    tx = optim_lib.make_optimizer(config.optim, config.max_steps, clip=False)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             ("data", "fsdp", "tensor"))
    abstract, _ = step_lib.state_shardings(cfg, config.train, tx, mesh, config.mesh.rules
                                           if "rules" in config.mesh else None)
    moments = [x for x in jax.tree.leaves(abstract["opt_state"]) if x.ndim]
    adapter_leaves = jax.tree.leaves(adapters)
    assert len(adapter_leaves) == 2 * len(TARGETS)
    assert len(moments) == len(adapter_leaves)  # LION: one moment per adapter leaf
    assert sorted(m.shape for m in moments) == sorted(a.shape for a in adapter_leaves)

    # merged = unmerged after training; the export loads in peft with our logits
    ids = _ids()
    merged = np.asarray(load_pretrained(workdir)(ids))
    np.testing.assert_allclose(np.asarray(unmerged(ids)), merged, atol=1e-5, rtol=1e-5)
    assert convert.main(["export", str(workdir), str(tmp_path / "peft")]) == 0
    from peft import PeftModel
    from transformers import MptForCausalLM

    pm = PeftModel.from_pretrained(MptForCausalLM.from_pretrained(root / "hf"),
                                   str(tmp_path / "peft")).eval()
    np.testing.assert_allclose(_hf_logits(pm, ids), merged, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_lora_accumulated_and_resumed_run_matches(base, lora_run, tmp_path, monkeypatch):
    """Micro-batches of 2 rows, stopped after step 2 and resumed: the plain run's losses; then
    a resume over another base is refused (the fingerprint)."""
    from mpt_jax.train import trainer

    root, _ = base
    _, full = lora_run

    split = str(tmp_path / "split")
    with monkeypatch.context() as m:
        stop_at_check(m, 2)
        first = trainer.train(_config(tmp_path, root, **{"train.micro_batch_size": 2}), split)
    assert first["stopped"].startswith("signal") and first["step"] == 2
    again = trainer.train(_config(tmp_path, root, **{"train.micro_batch_size": 2}), split)
    assert again["step"] == 4
    want, got = read_losses(str(full)), read_losses(split)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)],
                               rtol=1e-5)

    other = tmp_path / "other"
    shutil.copytree(root / "hf", other)
    hf = hf_model(CFG, seed=9, std=0.1)
    hf.save_pretrained(other)
    with pytest.raises(ValueError, match="is not the base this LoRA run started from") as err:
        trainer.train(_config(tmp_path, root, **{"train.init_from": str(other),
                                                 "max_steps": 6}), split)
    assert "\n" not in str(err.value)


SHARDED = textwrap.dedent(r'''
    import runpy, sys
    import jax
    assert jax.device_count() == 4
    from mpt_jax.train import trainer
    c = runpy.run_path(sys.argv[1])["get_config"]()
    c.mesh.fsdp, c.mesh.tensor = 2, 2
    # (no remat here: XLA's CPU backend at -O0, subprocess_env's, makes NaN gradients of a
    # rematerialised step on a sharded mesh, with or without LoRA; the in-process runs remat)
    c.train.remat_policy = "none"
    c.max_steps = 2
    trainer.train(c, sys.argv[2])
    import optax
    from mpt_jax import sharding
    from mpt_jax.train import step as step_lib
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
    _, sh = step_lib.state_shardings(trainer.check_config(c), c.train, optax.identity(), mesh,
                                     sharding.rules_from_config(c.mesh.rules))
    attn, ffn = sh["params"]["blocks"]["attn"], sh["params"]["blocks"]["ffn"]
    print("SPECS", [tuple(x.spec) for x in (attn["Wqkv_lora"]["a"], attn["Wqkv_lora"]["b"],
                                            ffn["down_proj_lora"]["a"])])
''')


@pytest.mark.slow
def test_lora_on_four_fake_devices_matches_one(base, lora_run, tmp_path):
    """fsdp 2 x tensor 2: the adapters sharded by their logical axes, the losses unchanged."""
    root, _ = base
    _, full = lora_run
    cfg = _config_file(tmp_path / "cfg.py", root)
    out = subprocess.run([sys.executable, "-c", SHARDED, cfg, str(tmp_path / "run")], cwd=ROOT,
                         env=subprocess_env(4), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    want, got = read_losses(str(full)), read_losses(str(tmp_path / "run"))
    np.testing.assert_allclose([got[1], got[2]], [want[1], want[2]], rtol=1e-5)
    # A [layers, in, rank], B [layers, rank, out]: sharded like the weights they adapt
    assert ("SPECS [(None, 'fsdp', None), (None, None, 'tensor'), (None, 'tensor', None)]"
            in out.stdout), out.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over,needle", [
    ({"train.lora.targets": ("Wqkv", "q_proj")}, "unknown lora target module 'q_proj'"),
    ({"train.lora.rank": -1}, "train.lora.rank=-1: must be an integer >= 0"),
    ({"train.lora.targets": ("gate_proj",)}, "has no gate_proj (only mptglu)"),
    ({"train.init_from": ""}, "LoRA adapts a pretrained model; set train.init_from"),
])
def test_bad_lora_config_is_one_line_before_anything_is_written(base, tmp_path, over, needle):
    from mpt_jax.train import trainer

    root, _ = base
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(needle)) as err:
        trainer.train(_config(tmp_path, root, **over), str(workdir))
    assert "\n" not in str(err.value)
    assert not workdir.exists()


@pytest.mark.slow
def test_train_py_adapter_for_another_base_exits_1_with_one_line(base, tmp_path):
    root, _ = base
    _peft_dir(root / "hf_wide", tmp_path / "peft", targets=("Wqkv",))
    cfg = _config_file(tmp_path / "cfg.py", root, **{
        "train.lora.adapter": str(tmp_path / "peft"), "train.lora.rank": 3,
        "train.lora.alpha": 12.0, "train.lora.targets": ("Wqkv",)})
    out = subprocess.run([sys.executable, "train.py", f"--config={cfg}",
                          f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "has shape [2, 44, 3], the base model wants [2, 40, 3]" in err[0], \
        out.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_finetune_further_from_a_peft_adapter_starts_at_peft_loss(base, tmp_path):
    """train.lora.adapter = a directory peft saved: step 0's held-out loss is PEFT's."""
    from mpt_jax.data import pipeline as data_lib
    from mpt_jax.train import trainer

    root, _ = base
    pm = _peft_dir(root / "hf", tmp_path / "peft")
    config = _config(tmp_path, root, **{
        "train.lora.adapter": str(tmp_path / "peft"), "train.lora.rank": 3,
        "train.lora.alpha": 12.0, "max_steps": 1, "train.remat_policy": "none"})
    workdir = tmp_path / "run"
    trainer.train(config, str(workdir))
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    (step0,) = [r for r in rows if r["step"] == 0]
    sums = [_hf_masked_nll(pm, b) for b in data_lib.make_eval_batches(
        config.data, seq_len=T, batch_size=4, num_batches=2, workdir=str(workdir))]
    np.testing.assert_allclose(step0["eval_loss"], sum(s for s, _ in sums) /
                               sum(c for _, c in sums), rtol=1e-5)
