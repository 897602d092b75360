"""convert_torch.py import/export and load_pretrained: logits equal transformers' through every
path, sharded / bf16 / fp16 / `model.`-prefixed sources, llm-foundry-only options round trip
exactly (remote-code form), trainer checkpoints load, and every bad input exits 1 with one line
on stderr naming the file, leaving no DST behind."""
import json
import os
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as torch_save_file
from transformers import MptForCausalLM

from conftest import (HF_CONFIGS, NP_CONFIGS, _ids_mask, hf_logits, hf_model, hf_state,
                      np_forward, random_pure)
from mpt_jax import load_pretrained
from mpt_jax.convert.convert import ParamsReader, main
from mpt_jax.convert.table import model_shapes, name_table
from mpt_jax.model import abstract_model

TOKENIZER = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}",
             "special_tokens_map.json": "{}"}


def _logits(model, ids, mask=None):
    kw = {} if mask is None else {"attention_mask": jnp.asarray(mask)}
    return np.asarray(model(jnp.asarray(ids, jnp.int32), **kw))


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A native HF MPT (3 heads, fp32) saved with save_pretrained, plus tokenizer files."""
    cfg = HF_CONFIGS["h3"]
    hf = hf_model(cfg, seed=11)
    d = tmp_path_factory.mktemp("hf") / "mpt"
    hf.save_pretrained(d)
    for k, v in TOKENIZER.items():
        (d / k).write_text(v)
    ids, mask = _ids_mask(seed=11)
    return d, cfg, hf_logits(hf, ids), hf_logits(hf, ids, mask), ids, mask, hf


def test_model_shapes_equal_abstract_model():
    for cfg in list(HF_CONFIGS.values()) + list(NP_CONFIGS.values()):
        pure = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
        flat = jax.tree_util.tree_flatten_with_path(pure)[0]
        assert {tuple(str(k.key) for k in kp): x.shape for kp, x in flat} == model_shapes(cfg)


@pytest.mark.slow
def test_import_load_export_reload_matches_transformers(hf_dir, tmp_path, capsys):
    src, cfg, ref, ref_m, ids, mask, _ = hf_dir
    assert np.abs(_logits(load_pretrained(src), ids) - ref).max() <= 1e-4  # HF dir directly
    ours, out = tmp_path / "ours", tmp_path / "export"
    assert _run(["import", src, ours], capsys)[0] == 0
    assert all((ours / k).read_text() == v for k, v in TOKENIZER.items())
    model = load_pretrained(ours)
    assert np.abs(_logits(model, ids) - ref).max() <= 1e-4
    assert np.abs(_logits(model, ids, mask) - ref_m)[mask > 0].max() <= 1e-4
    # the params dir is an ordinary orbax checkpoint (what the trainer restores)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    restored = ocp.StandardCheckpointer().restore(ours / "params", target)
    np.testing.assert_array_equal(restored["blocks"]["attn"]["Wqkv"],
                                  model.blocks.attn.Wqkv[...])
    rc, stdout, _ = _run(["export", ours, out, "--max_shard_size", "0.00002"], capsys)
    assert rc == 0 and "note" not in stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert all((out / k).read_text() == v for k, v in TOKENIZER.items())
    hf2 = MptForCausalLM.from_pretrained(out).eval()
    assert np.abs(hf_logits(hf2, ids) - ref).max() <= 1e-4
    orig = {k: v for k, v in hf_state(hf_dir[6]).items() if k != "lm_head.weight"}
    back = {k: v for k, v in hf_state(hf2).items() if k != "lm_head.weight"}
    assert orig.keys() == back.keys() and all(np.array_equal(orig[k], back[k]) for k in orig)


def test_sharded_source_with_index(hf_dir, tmp_path, capsys):
    _, cfg, ref, _, ids, _, hf = hf_dir
    src = tmp_path / "sharded"
    hf.save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").exists()
    assert _run(["import", src, tmp_path / "ours"], capsys)[0] == 0
    assert np.abs(_logits(load_pretrained(tmp_path / "ours"), ids) - ref).max() <= 1e-4
    assert np.abs(_logits(load_pretrained(src), ids) - ref).max() <= 1e-4


@pytest.mark.parametrize("tdtype,name", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_half_precision_sources(hf_dir, tmp_path, capsys, tdtype, name):
    _, cfg, _, _, ids, _, hf = hf_dir
    src, ours, out = tmp_path / "half", tmp_path / "ours", tmp_path / "out"
    import copy
    copy.deepcopy(hf).to(tdtype).save_pretrained(src)
    ref = hf_logits(MptForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), ids)
    assert _run(["import", src, ours], capsys)[0] == 0
    reader = ParamsReader(ours / "params")
    assert reader.shape_dtype(("blocks", "attn", "Wqkv"))[1].name == name  # stored as source
    model = load_pretrained(ours, param_dtype=jnp.float32)
    assert model.wte[...].dtype == jnp.float32
    assert np.abs(_logits(model, ids) - ref).max() <= 1e-4
    assert _run(["export", ours, out], capsys)[0] == 0  # as stored: identical bytes
    from safetensors.torch import load_file
    orig = load_file(src / "model.safetensors")
    back = {}
    for f in out.glob("*.safetensors"):
        back.update(load_file(f))
    assert orig.keys() == back.keys()
    assert all(torch.equal(orig[k], back[k]) and back[k].dtype == tdtype for k in orig)
    assert _run(["export", ours, tmp_path / "o32", "--dtype", "fp32"], capsys)[0] == 0
    assert json.loads((tmp_path / "o32" / "config.json").read_text())["torch_dtype"] == "float32"


def _write_foundry_source(d: Path, cfg, pure, prefix="", shard=False, torch_save=False):
    """A llm-foundry-style checkpoint from our pure dict via the name table (torch layout)."""
    d.mkdir(parents=True)
    tensors = {}
    for r in name_table(cfg):
        arr = pure
        for k in r.path:
            arr = arr[k]
        for i, key in enumerate(r.keys(cfg.n_layers)):
            a = arr[i] if r.stacked else arr
            tensors[prefix + key] = np.ascontiguousarray(a.T if r.transpose else a)
    cfg.to_json_file(d / "config.json", form="foundry")
    if torch_save:
        def to_torch(v):
            if v.dtype.name == "bfloat16":
                return torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16)
            return torch.from_numpy(v.copy())
        torch_save_file({k: to_torch(v) for k, v in tensors.items()},
                        d / "model.safetensors", metadata={"format": "pt"})
    elif shard:
        keys = sorted(tensors)
        parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        wm = {}
        for j, part in enumerate(parts):
            fn = f"model-{j + 1:05d}-of-00002.safetensors"
            np_save_file({k: tensors[k] for k in part}, d / fn, metadata={"format": "pt"})
            wm.update({k: fn for k in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    else:
        np_save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return tensors


@pytest.mark.parametrize("name", ["qk_ln_bias_gqa", "glu_silu_bias", "logit_scale_untied",
                                  "wpe_no_alibi_fraction", "alibi_bias_max_5_h6"])
@pytest.mark.slow
def test_foundry_only_options_round_trip(name, tmp_path, capsys):
    cfg = NP_CONFIGS[name]
    pure = random_pure(cfg, seed=7)
    src, ours, out, again = (tmp_path / n for n in ("src", "ours", "out", "again"))
    tensors = _write_foundry_source(src, cfg, pure, prefix="model.", shard=True)
    assert _run(["import", src, ours], capsys)[0] == 0
    ids, mask = _ids_mask(seed=7)
    ref = np_forward(cfg, pure, ids, mask)
    assert np.abs(_logits(load_pretrained(ours), ids, mask) - ref)[mask > 0].max() <= 1e-4
    rc, stdout, _ = _run(["export", ours, out], capsys)
    assert rc == 0 and "note:" in stdout and "remote-code" in stdout
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["MPTForCausalLM"] and "auto_map" in conf
    from safetensors.numpy import load_file
    back = {}
    for f in out.glob("*.safetensors"):
        back.update(load_file(f))
    assert back.keys() == {k[len("model."):] for k in tensors}
    assert all(np.array_equal(back[k[len("model."):]], v) for k, v in tensors.items())
    assert _run(["import", out, again], capsys)[0] == 0
    assert (again / "config.json").read_text() == (ours / "config.json").read_text()


@pytest.mark.slow
def test_model_prefix_torch_bf16(tmp_path, capsys):
    cfg = HF_CONFIGS["h4"]
    pure = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(np.float32), random_pure(cfg))
    _write_foundry_source(tmp_path / "src", cfg, jax.tree.map(
        lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16)), pure), prefix="model.",
        torch_save=True)
    assert _run(["import", tmp_path / "src", tmp_path / "ours"], capsys)[0] == 0
    ids, _ = _ids_mask()
    m = load_pretrained(tmp_path / "ours", param_dtype=jnp.float32)
    assert np.abs(_logits(m, ids) - np_forward(cfg, pure, ids)).max() <= 1e-4


@pytest.mark.slow
def test_trainer_checkpoint_layouts(tmp_path, capsys):
    """Trainer's CheckpointManager layout (params + model_config items, fp32, OCDBT): the step
    dir and the workdir (latest step) load and export."""
    cfg = NP_CONFIGS["gqa"]
    work = tmp_path / "work"
    mngr = ocp.CheckpointManager(work / "checkpoints")
    for step, seed in ((3, 1), (8, 2)):
        pure = jax.tree.map(jnp.asarray, random_pure(cfg, seed=seed))
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(pure),
            model_config=ocp.args.JsonSave(cfg.to_dict("foundry"))))
    mngr.wait_until_finished()
    ids, _ = _ids_mask()
    ref = np_forward(cfg, random_pure(cfg, seed=2), ids)
    for path in (work, work / "checkpoints" / "8"):
        assert np.abs(_logits(load_pretrained(path, dtype=jnp.float32), ids) - ref).max() <= 1e-4
    assert _run(["export", work, tmp_path / "out", "--dtype", "bf16"], capsys)[0] == 0
    assert _run(["import", tmp_path / "out", tmp_path / "ours"], capsys)[0] == 0
    m = load_pretrained(tmp_path / "ours", param_dtype=jnp.float32)
    assert m.wte[...].dtype == jnp.float32
    assert np.abs(_logits(m, ids) - ref).max() <= 0.1 * np.abs(ref).max()  # bf16 rounding


# ---------------------------------------------------------------------------------------------
# Bad input: exit 1, one line on stderr naming the file, DST absent
# ---------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return f


def _bad_header(d):
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 40) + b"{not json at all ......................}" + data[48:])
    return f


def _huge_header(d):
    f = d / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10**12) + f.read_bytes()[8:])
    return f


def _edit_tensors(d, fn):
    from safetensors.numpy import load_file
    f = d / "model.safetensors"
    t = load_file(f)
    fn(t)
    np_save_file(t, f, metadata={"format": "pt"})
    return f


def _missing_key(d):
    return _edit_tensors(d, lambda t: t.pop("transformer.blocks.1.ffn.up_proj.weight"))


def _unexpected_key(d):
    return _edit_tensors(d, lambda t: t.update({"transformer.blocks.2.norm_1.weight":
                                                np.ones(21, np.float32)}))


def _wrong_shape(d):
    return _edit_tensors(d, lambda t: t.update({"transformer.blocks.0.attn.Wqkv.weight":
                                                np.ones((60, 21), np.float32)}))


def _config_mismatch(d):
    c = json.loads((d / "config.json").read_text())
    c["vocab_size"] = 103
    (d / "config.json").write_text(json.dumps(c))
    return d / "model.safetensors"  # wte's shape no longer matches: named with its file


def _missing_file(d):
    (d / "model.safetensors").unlink()
    return d


def _missing_config(d):
    (d / "config.json").unlink()
    return d / "config.json"


def _bad_config(d):
    (d / "config.json").write_text('{"d_model": 22, "n_heads": 3}')
    return d / "config.json"


def _missing_shard(d):
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}))
    return d / "model-00001-of-00002.safetensors"


BAD_IMPORTS = [_truncate, _bad_header, _huge_header, _missing_key, _unexpected_key, _wrong_shape,
               _config_mismatch, _missing_file, _missing_config, _bad_config, _missing_shard]


@pytest.mark.parametrize("breaker", BAD_IMPORTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_import_inputs(breaker, hf_dir, tmp_path, capsys):
    src = _copy(hf_dir[0], tmp_path / "src")
    named = breaker(src)
    dst = tmp_path / "dst"
    rc, _, err = _run(["import", src, dst], capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert str(named) in lines[0], (named, err)
    assert not dst.exists() and os.listdir(tmp_path) == ["src"]  # no partial directory left


def test_bad_export_inputs_and_existing_dst(hf_dir, tmp_path, capsys):
    src = hf_dir[0]
    (tmp_path / "exists").mkdir()
    rc, _, err = _run(["import", src, tmp_path / "exists"], capsys)
    assert rc == 1 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path / "exists") == []
    ours = tmp_path / "ours"
    assert _run(["import", src, ours], capsys)[0] == 0
    rc, _, err = _run(["export", ours, tmp_path / "exists"], capsys)
    assert rc == 1 and str(tmp_path / "exists") in err and len(err.strip().splitlines()) == 1
    # a directory that is not a checkpoint; a config that does not match the params
    rc, _, err = _run(["export", src, tmp_path / "x"], capsys)
    assert rc == 1 and str(src) in err and len(err.strip().splitlines()) == 1
    c = json.loads((ours / "config.json").read_text())
    c["n_layers"] = 3
    (ours / "config.json").write_text(json.dumps(c))
    rc, _, err = _run(["export", ours, tmp_path / "x"], capsys)
    assert rc == 1 and str(ours / "params") in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert sorted(os.listdir(tmp_path)) == ["exists", "ours"]


@pytest.mark.slow
def test_cli_script_subprocess(hf_dir, tmp_path):
    """The real entry point: exit status and a single stderr line, no traceback."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, str(root / "convert_torch.py"), "import",
                        str(tmp_path / "nope"), str(tmp_path / "dst")],
                       capture_output=True, text=True, cwd=root)
    assert p.returncode == 1
    lines = [l for l in p.stderr.splitlines() if "Warning" not in l and l.strip()]
    assert lines == [f"error: {tmp_path / 'nope'}: does not exist"], p.stderr


@pytest.mark.slow
def test_native_config_means_what_transformers_computes(tmp_path, capsys):
    """A config.json of transformers' own MptForCausalLM (no llm-foundry auto_map) is read as
    native MPT reads it: options it ignores (logit_scale, alibi_bias_max, norm_type) are ignored
    and named in a note, so the logits are HF's. An untied lm_head and eos_token_id travel, and
    the export is native again and loads in transformers with the same logits."""
    from transformers import MptConfig

    d = HF_CONFIGS["h3"].to_dict("hf")
    d.update(logit_scale=0.5, norm_type="rmsnorm", tie_word_embeddings=False, eos_token_id=0)
    d["attn_config"] = dict(d["attn_config"], alibi_bias_max=4)
    torch.manual_seed(3)
    hf = MptForCausalLM(MptConfig(**d)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.25) if p.ndim > 1 else p.normal_(1.0, 0.1)
    src, ours, out = tmp_path / "src", tmp_path / "ours", tmp_path / "out"
    hf.save_pretrained(src)
    ids, mask = _ids_mask(seed=3)
    ref = hf_logits(hf, ids, mask)
    rc, stdout, _ = _run(["import", src, ours], capsys)
    assert rc == 0 and "note:" in stdout, stdout
    assert all(s in stdout for s in ("logit_scale=0.5", "alibi_bias_max=4", "norm_type=rmsnorm"))
    assert np.abs(_logits(load_pretrained(ours), ids, mask) - ref)[mask > 0].max() <= 1e-4
    with pytest.warns(UserWarning, match="logit_scale=0.5"):
        direct = load_pretrained(src)
    assert np.abs(_logits(direct, ids, mask) - ref)[mask > 0].max() <= 1e-4
    rc, stdout, _ = _run(["export", ours, out], capsys)
    assert rc == 0 and "note" not in stdout, stdout
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["MptForCausalLM"] and "auto_map" not in conf
    assert conf["tie_word_embeddings"] is False and conf["eos_token_id"] == 0
    back = MptForCausalLM.from_pretrained(out).eval()
    assert back.config.eos_token_id == 0
    np.testing.assert_array_equal(hf_logits(back, ids, mask), ref)


def test_missing_chunk_is_an_error_and_outputs_honour_the_umask(hf_dir, tmp_path, capsys):
    """A chunk file lost from our checkpoint (an interrupted copy) fails export and loading
    instead of reading as zeros; the directories the converter writes get the umask's mode."""
    from mpt_jax.convert.convert import ConversionError

    ours, out = tmp_path / "ours", tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert _run(["import", hf_dir[0], ours], capsys)[0] == 0
        assert _run(["export", ours, out], capsys)[0] == 0
    finally:
        os.umask(old)
    assert (os.stat(ours).st_mode & 0o777) == (os.stat(out).st_mode & 0o777) == 0o755
    (ours / "params" / "blocks.attn.Wqkv" / "1.0.0").unlink()
    rc, _, err = _run(["export", ours, tmp_path / "again"], capsys)
    assert rc == 1 and "1.0.0" in err and "missing" in err, err
    assert not (tmp_path / "again").exists()
    with pytest.raises(ConversionError, match="missing"):
        load_pretrained(ours)


def test_cli_refusals_name_the_problem(hf_dir, tmp_path, capsys):
    """--max_shard_size must be positive; a missing SRC does not exist, a file is not a
    directory; a DST under a file names its parent as not a directory. One line, exit 1."""
    ours = tmp_path / "ours"
    assert _run(["import", hf_dir[0], ours], capsys)[0] == 0
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["export", ours, tmp_path / "o1", "--max_shard_size", "0"],
         "--max_shard_size must be a positive number of GB, got 0"),
        (["export", ours, tmp_path / "o2", "--max_shard_size", "nan"],
         "--max_shard_size must be a positive number of GB, got nan"),
        (["export", tmp_path / "missing", tmp_path / "o3"],
         f"{tmp_path / 'missing'}: does not exist"),
        (["export", afile, tmp_path / "o4"], f"{afile}: not a directory"),
        (["import", tmp_path / "missing", tmp_path / "o5"],
         f"{tmp_path / 'missing'}: does not exist"),
        (["import", hf_dir[0], afile / "sub"],
         f"{afile}: destination's parent is not a directory"),
        (["import", hf_dir[0], tmp_path / "no" / "sub"],
         f"{tmp_path / 'no'}: destination's parent directory does not exist"),
    ]
    for argv, line in cases:
        rc, _, err = _run(argv, capsys)
        assert rc == 1 and err.strip().splitlines() == [f"error: {line}"], (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["afile", "ours"]


def test_trainer_step_directory_exports_its_tokenizer(tmp_path, capsys):
    """The trainer saves the run's tokenizer.json as each step's `tokenizer` item (and in the
    workdir): export from the step directory alone, or from a workdir without its own copy,
    carries it to the HF directory."""
    from mpt_jax.train import checkpoint as ckpt_lib

    cfg = NP_CONFIGS["gqa"]
    tok = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}
    manager = ckpt_lib.make_manager(str(tmp_path / "work"), keep=2)
    pure = jax.tree.map(jnp.asarray, random_pure(cfg, seed=1))
    ckpt_lib.save(manager, 5, {"params": pure, "opt_state": {"count": jnp.int32(0)}},
                  model_config=cfg.to_dict("foundry"),
                  train_state={"step": 5, "data_states": [{}]}, tokenizer=tok)
    manager.wait_until_finished()
    step_dir = tmp_path / "work" / "checkpoints" / "5"
    assert json.loads((step_dir / "tokenizer" / "tokenizer.json").read_text()) == tok
    for src, dst in ((step_dir, tmp_path / "from_step"),
                     (tmp_path / "work", tmp_path / "from_work")):
        assert _run(["export", src, dst], capsys)[0] == 0
        assert json.loads((dst / "tokenizer.json").read_text()) == tok


def test_sigterm_mid_export_leaves_no_partial_directory(hf_dir, tmp_path, capsys, monkeypatch):
    """A conversion killed with SIGTERM (a scheduler, `kill`) cleans up as Ctrl-C does: exit
    130, one line, no hidden `.partial-` directory left beside the destination."""
    import signal

    from mpt_jax.convert import convert as convert_mod

    ours = tmp_path / "ours"
    assert _run(["import", hf_dir[0], ours], capsys)[0] == 0
    writer = convert_mod.SafetensorsWriter
    real = writer.write

    def write(self, key, arr):  # the first tensor is written, then the signal comes
        real(self, key, arr)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(writer, "write", write)
    before = signal.getsignal(signal.SIGTERM)
    rc, _, err = _run(["export", ours, tmp_path / "out"], capsys)
    assert rc == 130 and err.strip().splitlines() == ["interrupted: nothing was written"], err
    assert sorted(os.listdir(tmp_path)) == ["ours"]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
