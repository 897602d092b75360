"""The command lines' refusals: each bad input is one line on stderr and exit status 1, no
traceback; train.py --help exits 0. train.py runs as a real process (absl flags are global),
generate.py in this one."""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env, tiny


def _load_generate_cli():
    spec = importlib.util.spec_from_file_location("generate_cli",
                                                  os.path.join(ROOT, "generate.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


@pytest.mark.slow
def test_train_py_bad_command_lines_are_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    (tmp_path / "syntax.py").write_text("def get_config(:\n    pass\n")
    (tmp_path / "noget.py").write_text("X = 1\n")
    work = str(tmp_path / "w")
    cases = {
        "workdir_is_a_file": (["--config=configs/tiny.py", f"--workdir={afile}"],
                              f"--workdir {afile}: a file, not a directory"),
        "syntax_error": ([f"--config={tmp_path / 'syntax.py'}", f"--workdir={work}"],
                         f"--config {tmp_path / 'syntax.py'}: line 1: invalid syntax"),
        "unknown_size": (["--config=configs/mpt.py:9b", f"--workdir={work}"],
                         "--config configs/mpt.py:9b: unknown MPT size '9b'"),
        "no_get_config": ([f"--config={tmp_path / 'noget.py'}", f"--workdir={work}"],
                          f"--config {tmp_path / 'noget.py'}: the file defines no get_config()"),
        "tiny_not_shards": (["--config=configs/tiny.py:foo", f"--workdir={work}"],
                            "data source 'shards': shards directory 'foo' does not exist"),
        "bad_optimizer": (["--config=configs/tiny.py", f"--workdir={work}",
                           "--config.optim.name=adam"], "unknown optim.name 'adam'"),
        "unknown_key": (["--config=configs/tiny.py", f"--workdir={work}",
                         "--config.train.seqlen=3"], "unknown config key 'seqlen'"),
        "missing_config": ([f"--config={tmp_path / 'nope.py'}", f"--workdir={work}"],
                           "cannot load --config"),
    }
    env = subprocess_env()
    procs = {name: subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, _) in cases.items()}
    help_out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0 and "--workdir" in help_out.stdout, help_out.stderr
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 1, (name, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("train.py: error: "), (name, err[-2000:])
        assert cases[name][1] in lines[0], (name, lines[0])
    assert not os.path.exists(work)  # nothing got as far as making the workdir


def test_generate_py_refusals(tmp_path, capsys):
    """--prompt empty, --mesh not three integers or not this machine's devices, --eos_id not a
    token of the model, a checkpoint that does not exist."""
    from conftest import hf_model
    from mpt_jax.data import tokenizer as tokenizer_lib

    cfg = tiny(vocab_size=307)
    hf_model(cfg).save_pretrained(tmp_path / "hf")
    tokenizer_lib.train_byte_level_bpe(["def main(argv):\n    return 0\n"] * 10, 300).save(
        str(tmp_path / "hf" / "tokenizer.json"))
    cli = _load_generate_cli()
    ckpt = str(tmp_path / "hf")
    cases = [
        (["--checkpoint", ckpt, "--prompt", ""], "--prompt is empty"),
        (["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"],
         f"checkpoint {str(tmp_path / 'nope')!r} does not exist"),
        (["--checkpoint", ckpt, "--prompt", "x", "--mesh", "a,b"],
         "--mesh 'a,b': expected three integers data,fsdp,tensor (one may be -1), e.g. 1,1,-1"),
        (["--checkpoint", ckpt, "--prompt", "x", "--mesh", "2,1,1"],
         "--mesh 2,1,1: mesh: data=2, fsdp=1, tensor=1 uses 2 devices, but there are 1"),
        (["--checkpoint", ckpt, "--prompt", "x", "--eos_id", "99999", "--dtype", "float32"],
         "--eos_id 99999 is not a token id of this model (vocab_size 307)"),
    ]
    for argv, line in cases:
        capsys.readouterr()
        assert cli.main(argv) == 1, argv
        err = [ln for ln in capsys.readouterr().err.splitlines()
               if not ln.startswith("[generate]")]
        assert err == [f"generate.py: {line}"], (argv, err)  # the whole line
