"""The CPU finetuning demo shrunk (configs/tiny.py then configs/tiny_sft.py, as the README runs
them, on 40 stdlib files and a prime-ish tiny model): train.py finetunes the pretrained workdir
through train.init_from, the held-out response loss falls below the pretrained model's (the
step-0 evaluation), and generate.py answers a held-out prompt in the instruct template."""
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, prepare_small_builtin, subprocess_env, write_test_config

SEQ = 128  # (the 384-token BPE's instruct template alone is ~60 tokens: responses truncated)


@pytest.mark.slow
def test_tiny_sft_demo_end_to_end(tmp_path, monkeypatch):
    from mpt_jax.data import corpus, finetune, prepare, sft_corpus

    pre, sft = tmp_path / "tiny", tmp_path / "tiny_sft"
    all_files = corpus.stdlib_files()
    prepare_small_builtin(str(pre), monkeypatch)  # (stdlib_files: 40 files from here on)
    env = subprocess_env()
    pre_cfg = write_test_config(str(tmp_path / "pre.py"), None)
    out = subprocess.run([sys.executable, "train.py", f"--config={pre_cfg}",
                          f"--workdir={pre}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # the built-in instruction set of 200 stdlib files, prepared as the trainer would
    # (train.py finds it prepared)
    monkeypatch.setattr(corpus, "stdlib_files", lambda: all_files[:200])
    shards = sft_corpus.prepare_builtin("python_stdlib_sft", str(sft / "data"),
                                        tokenizer=str(pre / "tokenizer.json"), max_seq_len=SEQ,
                                        on_too_long="truncate")
    assert prepare.read_manifest(shards)["records"] >= 150
    (tmp_path / "sft.py").write_text(textwrap.dedent(f'''\
        from configs import tiny_sft

        def get_config():
            c = tiny_sft.get_config({str(pre)!r})
            c.model.d_model, c.model.n_heads, c.model.n_layers = 40, 4, 2  # the pretrained's
            c.model.max_seq_len = c.train.seq_len = c.data.builtin_max_seq_len = {SEQ}
            c.data.builtin_on_too_long = "truncate"
            c.train.global_batch_size, c.train.loss_chunk_size = 8, 8
            c.eval.batch_size, c.eval.num_batches = 2, 2
            c.data.eval_fraction, c.data.prefetch = 0.1, 0
            c.optim.lr, c.optim.warmup_steps = 3e-3, 2
            c.max_steps, c.log_every, c.eval_every, c.checkpoint_every = 16, 4, 8, 8
            return c
        '''))
    out = subprocess.run([sys.executable, "train.py", f"--config={tmp_path / 'sft.py'}",
                          f"--workdir={sft}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "finetuning from" in out.stderr
    evals = {}
    for line in open(sft / "metrics.jsonl"):
        row = json.loads(line)
        if "eval_loss" in row:
            evals[row["step"]] = row["eval_loss"]
    assert sorted(evals) == [0, 8, 16]
    assert evals[16] < evals[0] - 0.3, evals  # the pretrained model's loss, then the finetune's
    # a held-out example's prompt (every 10th record is held out: the shortest), in the template
    import grain
    import numpy as np

    from mpt_jax.data import tokenizer as tokenizer_lib

    manifest = prepare.read_manifest(shards)
    source = grain.sources.ArrayRecordDataSource(prepare.shard_paths(shards, manifest))
    held_out = [finetune.decode_record(source[i], manifest["dtype"])
                for i in range(9, len(source), 10)]
    ids, mask = min(held_out, key=lambda r: int((r[1] == 0).sum()))  # room for 12 new tokens
    prompt = tokenizer_lib.load_tokenizer(str(pre)).decode([int(i) for i in ids[mask == 0]])
    assert prompt.startswith(finetune.INSTRUCT_INTRO) and np.all(mask[:len(prompt) and 1] == 0)
    gen = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(sft), "--prompt",
                          prompt, "--max_new_tokens", "12", "--dtype", "float32"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.strip(), gen
