"""Two CPU processes (gloo collectives, 2 fake devices each) train the small config, checkpoint,
resume, and match one process on 4 devices: the TPU-pod code path, for real."""
import json
import os
import shutil
import subprocess
import sys

import glob
import sysconfig

import portpicker
import pytest

from conftest import ROOT, read_losses, subprocess_env, write_test_config

SEQ_LEN = 24  # write_test_config's train.seq_len


@pytest.fixture(scope="module")
def row_corpus(tmp_path_factory):
    """Documents of exactly SEQ_LEN tokens (EOS included), so every document is one row and a
    process's share of the records (data.shuffle off) makes the same global batch, up to row
    order, as one process reading them all: the runs can then be compared loss for loss."""
    from mpt_jax.data import prepare, tokenizer

    out = str(tmp_path_factory.mktemp("rows"))
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:40]
    texts = [open(p, errors="replace").read()[:8000] for p in files]
    tok = tokenizer.train_byte_level_bpe(texts, 384)
    tok_path = os.path.join(out, "tokenizer.json")
    tok.save(tok_path)
    docs = []
    for text in texts:
        ids = tok.encode(text).ids
        for i in range(0, len(ids) - SEQ_LEN, SEQ_LEN):
            piece = tok.decode(ids[i:i + SEQ_LEN - 1])
            if len(tok.encode(piece).ids) == SEQ_LEN - 1:
                docs.append(piece)
    docs = docs[:400]
    with open(os.path.join(out, "docs.jsonl"), "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    shards = os.path.join(out, "shards")
    prepare.prepare_dataset([os.path.join(out, "docs.jsonl")], shards, tok_path, seq_len=None,
                            keep_documents=True)
    return shards


@pytest.mark.slow
def test_two_processes_checkpoint_resume_and_match_one_process(row_corpus, tmp_path):
    # mesh data=2 x fsdp=2: the batch is split over processes and devices, params over fsdp
    config_path = write_test_config(str(tmp_path / "cfg.py"), row_corpus, max_steps=6,
                                    checkpoint_every=3, eval_every=3)
    with open(config_path) as fh:
        text = fh.read()
    with open(config_path, "w") as fh:
        fh.write(text.replace("    return c", "    c.data.shuffle = False\n    return c"))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ref = subprocess.Popen(
        [sys.executable, "train.py", f"--config={config_path}", f"--workdir={one}",
         "--config.mesh.data=2"], cwd=ROOT, env=subprocess_env(n_devices=4),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _two_processes_with(config_path, two, "--config.mesh.data=2")
    _, err = ref.communicate(timeout=400)
    assert ref.returncode == 0, err[-3000:]
    want = read_losses(one)
    assert sorted(want) == list(range(1, 7))
    got = read_losses(two)
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got, want)

    # resume: drop the final checkpoint, rerun the same command: steps 4-6 again from step 3
    shutil.rmtree(os.path.join(two, "checkpoints", "6"))
    first = dict(got)
    os.remove(os.path.join(two, "metrics.jsonl"))
    _two_processes_with(config_path, two, "--config.mesh.data=2")
    resumed = read_losses(two)
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == first[step], (step, resumed, first)
    with open(os.path.join(two, "checkpoints", "6", "train_state", "metadata")) as fh:
        assert len(json.load(fh)["data_states"]) == 2


def _two_processes_with(config_path, workdir, *extra):
    port = portpicker.pick_unused_port()
    env = subprocess_env(n_devices=2)
    procs = [subprocess.Popen(
        [sys.executable, "train.py", f"--config={config_path}", f"--workdir={workdir}",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
         *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=400)
        errs.append(err)
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
