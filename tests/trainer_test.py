"""train_step on synthetic batches (chunked CE, accumulation, NaN), and train.py end to end on a
small prepared corpus: non-finite stop without a bad checkpoint; SIGTERM part way, then the same
command again, logs exactly the losses of an uninterrupted run."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, read_losses, read_train_rows, subprocess_env, write_test_config
from mpt_jax.train import loss as loss_lib
from mpt_jax import sharding
from mpt_jax.train import optim
from mpt_jax.train import step as step_lib
from mpt_jax.model.config import MPTConfig
from mpt_jax.model import MPTForCausalLM

# ---------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_chunked_cross_entropy_matches_full_logits():
    cfg = MPTConfig(d_model=24, n_heads=2, n_layers=1, vocab_size=131, max_seq_len=16)
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 0, 131)
    seg = jnp.array([[1] * 10 + [2] * 6, [1] * 16, [1] * 12 + [0] * 4])
    logits = model(ids)
    targets, weights = loss_lib.targets_and_weights(ids, seg)
    assert float(weights[2, 11]) == 0.0 and float(weights[0, 9]) == 1.0  # padding masked
    full = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    h, _ = model.hidden_states(ids)
    w = model.output_embedding()
    for chunk in (4, 8, 0):
        nll, count = loss_lib.chunked_cross_entropy(h, w, targets, weights, chunk_size=chunk)
        np.testing.assert_allclose(nll, jnp.sum(full * weights), rtol=1e-5)
        assert float(count) == float(jnp.sum(weights))


@pytest.mark.parametrize("logit_scale", [None, 0.37])
@pytest.mark.slow
def test_chunked_cross_entropy_gradients_match_full_logits(logit_scale):
    """The fused loss's own backward (gradient formed in the forward pass) equals autodiff
    through the full float32 logits, for h and the output embedding, with a cotangent != 1."""
    rng = np.random.default_rng()
    b, t, d, v = 3, 16, 24, 131
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(v, d)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    weights = jnp.asarray(rng.random((b, t)) > 0.2, jnp.float32)

    def full(h, w):
        logits = jnp.einsum("btd,vd->btv", h, w, precision="highest")
        if logit_scale is not None:
            logits = logits * logit_scale
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return 2.5 * jnp.sum(nll * weights)

    want = jax.grad(full, argnums=(0, 1))(h, w)
    for chunk in (4, 0):
        fused = lambda h, w, c=chunk: 2.5 * loss_lib.chunked_cross_entropy(  # noqa: E731
            h, w, targets, weights, chunk_size=c, logit_scale=logit_scale)[0]
        np.testing.assert_allclose(fused(h, w), full(h, w), rtol=1e-5)
        got = jax.grad(fused, argnums=(0, 1))(h, w)
        for g_got, g_want in zip(got, want):
            np.testing.assert_allclose(g_got, g_want, rtol=2e-5, atol=2e-6)
    # bf16 compute: the gradient comes back in each input's dtype
    gh, gw = jax.grad(lambda h, w: loss_lib.chunked_cross_entropy(
        h, w, targets, weights, chunk_size=8)[0], argnums=(0, 1))(h.astype(jnp.bfloat16), w)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.float32


def _step_setup(micro_batch_size, global_batch=4, clip_in_step=False, clip_norm=1.0):
    cfg = MPTConfig(d_model=24, n_heads=2, n_layers=2, vocab_size=131, max_seq_len=8)
    train = ml_collections.ConfigDict(dict(
        seq_len=8, global_batch_size=global_batch, micro_batch_size=micro_batch_size,
        compute_dtype="float32", param_dtype="float32", remat_policy="full", scan_layers=True,
        attn_impl="reference", loss_chunk_size=4, nonfinite="stop"))
    ocfg = ml_collections.ConfigDict(dict(
        name="decoupled_adamw", lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
        weight_decay_mask="all", mu_dtype="", clip_norm=clip_norm, schedule="constant",
        warmup_steps=0, alpha_f=0.0))
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
    tx = optim.make_optimizer(ocfg, 10, clip=not clip_in_step)
    settings = step_lib.make_settings(cfg, train, tx, lambda s: 1e-2, mesh=mesh,
                                      rules=sharding.DEFAULT_RULES, seed=0,
                                      global_batch=global_batch,
                                      clip_norm=clip_norm if clip_in_step else 0.0)
    state = step_lib.init_state(cfg, train, tx, mesh, sharding.DEFAULT_RULES, seed=3)
    return settings, state, mesh


def _jitted_step(settings):
    """train_step under one jit (op by op, its scan and cond would compile piece by piece)."""
    return jax.jit(lambda state, batch: step_lib.train_step(state, batch, settings=settings))


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch():
    batch = {"input_ids": jax.random.randint(jax.random.PRNGKey(0), (4, 8), 0, 131)}
    results = []
    for micro in (0, 1):
        settings, state, mesh = _step_setup(micro)
        assert settings.n_micro == (1 if micro == 0 else 4)
        with sharding.use_mesh(mesh):
            new_state, m = _jitted_step(settings)(state, batch)
        results.append((new_state, m))
    (s1, m1), (s4, m4) = results
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip_norm", [1e-3, 1e3])  # clipping bites / does not
@pytest.mark.slow
def test_clipping_in_the_step_equals_optax_clipping(clip_norm):
    """Clipping folded into the step's gradient scaling (the trainer's path) updates the
    params exactly as optax.clip_by_global_norm in the optimizer chain does."""
    batch = {"input_ids": jax.random.randint(jax.random.PRNGKey(5), (4, 8), 0, 131)}
    outs = []
    for in_step in (False, True):
        settings, state, mesh = _step_setup(0, clip_in_step=in_step, clip_norm=clip_norm)
        with sharding.use_mesh(mesh):
            outs.append(_jitted_step(settings)(state, batch))
    (s_optax, m_optax), (s_step, m_step) = outs
    np.testing.assert_allclose(m_step["grad_norm"], m_optax["grad_norm"], rtol=1e-6)
    moved = 0.0
    for a, b, p0 in zip(jax.tree.leaves(s_optax["params"]), jax.tree.leaves(s_step["params"]),
                        jax.tree.leaves(_step_setup(0)[1]["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        moved = max(moved, float(np.max(np.abs(np.asarray(a) - np.asarray(p0)))))
    assert moved > 0.0


@pytest.mark.slow
def test_nan_is_caught_and_update_not_applied():
    settings, state, mesh = _step_setup(0)
    state["params"]["wte"] = state["params"]["wte"].at[0, 0].set(jnp.nan)
    before = jax.tree.map(np.asarray, state)
    batch = {"input_ids": jnp.zeros((4, 8), jnp.int32)}
    with sharding.use_mesh(mesh):
        new_state, m = _jitted_step(settings)(state, batch)
    assert float(m["finite"]) == 0.0 and not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(new_state["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert int(new_state["opt_state"][1].count) == 0
    # the next step logs the lr it applies: the schedule's at 0 updates applied, not at step 1
    import dataclasses

    new_state["params"] = jax.tree.map(lambda x: jnp.nan_to_num(x), new_state["params"])
    ramp = dataclasses.replace(settings, lr_fn=lambda c: 0.5 + c)
    with sharding.use_mesh(mesh):
        _, m = _jitted_step(ramp)(new_state, batch)
    assert int(new_state["step"]) == 1 and float(m["finite"]) == 1.0 and float(m["lr"]) == 0.5


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def test_loss_spike_guard_state_resumes_the_same_judgement():
    """The guard's window and run of bad steps go into checkpoints (trainer.save): a guard
    restored from a JSON round trip of its state judges the next losses as the original."""
    from mpt_jax.train.monitor import LossSpikeGuard

    cfg = ml_collections.ConfigDict(dict(enabled=True, window=5, multiplier=2.0, patience=2,
                                         loss_cap=10.0, action="warn"))
    rng = np.random.default_rng()
    losses = list(rng.uniform(1.0, 1.2, 12)) + [5.0, 5.0, 1.1, 6.0, 6.0, 6.0]
    a = LossSpikeGuard(cfg)
    for x in losses[:6]:
        a.check(x)
    a.check(5.0)  # one bad step pending
    b = LossSpikeGuard(cfg)
    b.set_state(json.loads(json.dumps(a.state())))
    assert b.state() == a.state() and b.bad == 1
    assert [a.check(x) for x in losses[6:]] == [b.check(x) for x in losses[6:]]
    assert any(a.check(x) for x in (7.0, 7.0))  # the guard does fire


@pytest.mark.slow
def test_nonfinite_loss_stops_run_and_writes_no_bad_checkpoint(small_corpus, tmp_path):
    from mpt_jax.train import checkpoint as ckpt_lib

    config_path = write_test_config(str(tmp_path / "cfg.py"), small_corpus, max_steps=6,
                                    checkpoint_every=1)
    workdir = str(tmp_path / "run")
    # lr 1e30: step 1 is finite but blows the weights up; step 2's loss is not finite.
    out = subprocess.run([sys.executable, "train.py", f"--config={config_path}",
                          f"--workdir={workdir}", "--config.optim.lr=1e30",
                          "--config.optim.warmup_steps=0"],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "non-finite loss" in out.stderr and "last good checkpoint: 1" in out.stderr
    manager = ckpt_lib.make_manager(workdir, keep=3)
    assert manager.all_steps() == [1]


def _train_cmd(config_path, workdir):
    return [sys.executable, "train.py", f"--config={config_path}", f"--workdir={workdir}"]


@pytest.mark.slow
def test_sigterm_then_rerun_logs_the_uninterrupted_losses(small_corpus, tmp_path):
    config_path = write_test_config(str(tmp_path / "cfg.py"), small_corpus)
    env = subprocess_env()
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    # the interrupted run starts first; the uninterrupted one runs beside it, tracing steps 3-4
    proc = subprocess.Popen(_train_cmd(config_path, split), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    profile_flags = ["--config.profile.start_step=2", "--config.profile.num_steps=2"]
    ref = subprocess.Popen(_train_cmd(config_path, full) + profile_flags, cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(split, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and read_losses(split) and max(read_losses(split)) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    stopped_at = max(read_losses(split))
    assert stopped_at < 8, "the run finished before the signal arrived"
    assert "signal" in err
    from mpt_jax.train import checkpoint as ckpt_lib

    assert ckpt_lib.make_manager(split, keep=3).latest_step() == stopped_at
    again = subprocess.run(_train_cmd(config_path, split), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    want, got = read_losses(full), read_losses(split)
    assert sorted(want) == list(range(1, 9)) and sorted(got) == list(range(1, 9))
    assert got == want  # exactly: same floats
    assert os.path.exists(os.path.join(split, "loss.png"))
    # epochs per data source: logged every step, growing, and continued exactly by the resume
    want_epochs = {s: row["data_epochs"] for s, row in read_train_rows(full).items()}
    got_epochs = {s: row["data_epochs"] for s, row in read_train_rows(split).items()}
    assert got_epochs == want_epochs
    assert sorted(want_epochs) == list(range(1, 9)) and set(want_epochs[8]) == {"shards"}
    stdlib_epochs = [want_epochs[s]["shards"] for s in range(1, 9)]
    assert 0 < stdlib_epochs[0] and stdlib_epochs == sorted(stdlib_epochs)  # a fraction of one
    assert stdlib_epochs[-1] < 1  # epoch: 8 steps of 8 x 24 tokens, documents of ~1000s
    # the jax.profiler trace on request, and TensorBoard event files
    assert glob.glob(os.path.join(full, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    for workdir in (full, split):
        assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
    assert not os.path.exists(os.path.join(split, "profile"))  # only on request


@pytest.mark.slow
def test_train_py_refuses_bad_settings_clearly(small_corpus, tmp_path):
    """data.eval_fraction 0 trains without evaluation; then, each as one `train.py: error:`
    line and no traceback: a changed model on an existing workdir (named before any array is
    read), checkpoint.keep 0, a dtype that is not one, a misspelt key, a shard that the
    manifest lists but is gone."""
    import shutil

    config_path = write_test_config(str(tmp_path / "cfg.py"), small_corpus, max_steps=3,
                                    checkpoint_every=3)
    workdir = str(tmp_path / "run")

    def run(*extra, workdir=workdir):
        out = subprocess.run(_train_cmd(config_path, workdir) + list(extra), cwd=ROOT,
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
        return out.returncode, out.stderr

    rc, err = run("--config.data.eval_fraction=0")
    assert rc == 0, err[-2000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    assert rows and not [r for r in rows if "eval_loss" in r]

    def one_error(rc, err, *needles):
        lines = [ln for ln in err.splitlines() if ln.startswith("train.py: error:")]
        assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
        assert all(n in lines[0] for n in needles), lines[0]

    one_error(*run("--config.model.n_layers=3"), "different model config", "n_layers")
    fresh = str(tmp_path / "fresh")
    one_error(*run("--config.checkpoint.keep=0", workdir=fresh), "checkpoint.keep=0")
    one_error(*run("--config.train.compute_dtype=bfloat15", workdir=fresh),
              "train.compute_dtype='bfloat15'")
    one_error(*run("--config.train.seqlen=24", workdir=fresh),
              "unknown config key 'seqlen' Did you mean \"seq_len\"")
    broken = str(tmp_path / "broken")
    shutil.copytree(small_corpus, broken)
    os.remove(sorted(glob.glob(os.path.join(broken, "*.array_record")))[0])
    one_error(*run(f"--config.data.sources.shards.path={broken}", workdir=fresh),
              "is missing")


# ---------------------------------------------------------------------------------------------
# The loop's host side, config checks, the loss plot
# ---------------------------------------------------------------------------------------------
def test_step_metrics_are_read_one_step_late_in_order():
    """push(step) hands on the metrics of the step before it (the one just dispatched stays
    on the devices), flush() the last one; every step exactly once, in order."""
    from mpt_jax.train.monitor import StepMetrics

    seen = []
    reader = StepMetrics(lambda step, values: seen.append((step, values)))
    step_fn = jax.jit(lambda x: {"loss": x * 2.0, "finite": jnp.isfinite(x).astype(jnp.float32)})
    reader.push(1, step_fn(jnp.float32(1.5)))
    assert seen == []
    reader.push(2, step_fn(jnp.float32(jnp.inf)))
    assert seen == [(1, {"loss": 3.0, "finite": 1.0})]
    assert reader.flush() == {"loss": float("inf"), "finite": 0.0}
    assert seen[1] == (2, {"loss": float("inf"), "finite": 0.0})
    assert reader.flush() is None and len(seen) == 2


def _tiny_run_config(**overrides):
    from configs import tiny

    c = tiny.get_config()
    with c.unlocked():
        for key, value in overrides.items():
            target = c
            *parents, leaf = key.split(".")
            for p in parents:
                target = target[p]
            target[leaf] = value
    return c


@pytest.mark.parametrize("key,value,needle", [
    ("optim.name", "adam", "unknown optim.name 'adam'"),
    ("optim.schedule", "step", "unknown schedule 'step'"),
    ("optim.warmup_steps", 400, "warmup_steps (400) must be < max_steps (300)"),
    ("train.compute_dtype", "bfloat15", "train.compute_dtype='bfloat15'"),
    ("train.remat_policy", "some", "train.remat_policy='some'"),
    ("train.attn_impl", "flash", "train.attn_impl='flash'"),
    ("train.seq_len", 256, "train.seq_len 256 must be in [1, model.max_seq_len 128]"),
    ("train.loss_chunk_size", 48, "loss_chunk_size 48 must divide train.seq_len 128"),
    ("train.micro_batch_size", 5, "not a multiple of train.micro_batch_size 5"),
    ("model.n_heads", 3, "divisible by n_heads (3)"),
    ("model.attn_config.attn_pdrop", 0.1, "attention-probability dropout is not supported"),
    ("mesh.fsdp", 3, "mesh: data=1, fsdp=3, tensor=1 uses 3 devices"),
    ("eval.batch_size", 0, "eval.batch_size must be positive, got 0"),
    ("data.eval_fraction", 0.7, "eval_fraction must be 0 or in"),
    ("data.builtin", "wikipedia", "unknown built-in corpus"),
    ("checkpoint.keep", 0, "checkpoint.keep=0"),
])
def test_config_is_checked_before_any_data_is_prepared(tmp_path, key, value, needle):
    """configs/tiny.py would prepare the built-in corpus into WORKDIR/data first thing: a bad
    value anywhere is refused before that, and leaves no workdir."""
    from mpt_jax.train import trainer

    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(needle)):
        trainer.train(_tiny_run_config(**{key: value}), str(workdir))
    assert not workdir.exists()


def test_smoothed_train_loss_and_the_plot(tmp_path):
    from mpt_jax.train import metrics

    assert metrics.smoothed([3.0, 3.0, 3.0], 5) == pytest.approx([3.0, 3.0, 3.0])
    assert metrics.smoothed([1.0, 5.0, 2.0], 1) == [1.0, 5.0, 2.0]  # window 1: the raw values
    x = [4.0, 2.0, 6.0, 1.0]
    beta, m, want = 1 - 2 / 4, 0.0, []  # window 3, written out
    for i, v in enumerate(x):
        m = beta * m + (1 - beta) * v
        want.append(m / (1 - beta ** (i + 1)))
    assert metrics.smoothed(x, 3) == pytest.approx(want)
    rng = np.random.default_rng()
    noisy = list(3.0 + rng.normal(0, 0.5, 200))
    assert np.std(metrics.smoothed(noisy, 20)[50:]) < 0.5 * np.std(noisy)
    with open(tmp_path / "metrics.jsonl", "w") as fh:
        for step in range(1, 41):
            fh.write(json.dumps({"step": step, "loss": noisy[step]}) + "\n")
        fh.write(json.dumps({"step": 40, "eval_loss": 3.1}) + "\n")
    out = metrics.plot_losses(str(tmp_path))
    assert out == str(tmp_path / "loss.png") and os.path.getsize(out) > 10_000


@pytest.mark.slow
def test_copied_workdir_resumes_exactly_and_carries_its_tokenizer(tmp_path, monkeypatch,
                                                                   capsys):
    """The demo's path with the built-in corpus in the workdir: the run's tokenizer lies in the
    workdir and every step directory; re-running a finished run says so; `cp -r` of the
    workdir (original moved away: no absolute path may be needed) resumes with no data
    preparation and logs the losses of the uninterrupted run; generate.py and export find the
    tokenizer with no flag, and transformers loads the exported one."""
    import importlib.util
    import shutil

    from conftest import prepare_small_builtin
    from mpt_jax.convert.convert import main as convert_main
    from mpt_jax.convert.convert import tokenizer_dir
    from mpt_jax.data import tokenizer as tokenizer_lib

    run, copy = tmp_path / "run", tmp_path / "elsewhere" / "run"
    shards = prepare_small_builtin(str(run), monkeypatch)
    config_path = write_test_config(str(tmp_path / "cfg.py"), None)
    env = subprocess_env()
    first = subprocess.run(_train_cmd(config_path, run), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    want = read_losses(run)
    assert sorted(want) == list(range(1, 9))
    tok_json = (run / "tokenizer.json").read_text()
    assert tok_json == open(os.path.join(shards, "tokenizer.json")).read()
    for step in (3, 6, 8):
        saved = tokenizer_lib.load_tokenizer(str(run / "checkpoints" / str(step) / "tokenizer"))
        assert (tokenizer_lib.tokenizer_sha256(saved)
                == tokenizer_lib.tokenizer_sha256(tokenizer_lib.load_tokenizer(str(run))))

    again = subprocess.run(_train_cmd(config_path, run), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete at step 8" in again.stderr
    assert "step/s" not in again.stderr and "done:" not in again.stderr  # no bars, no summary
    assert read_losses(run) == want

    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    for step in ("6", "8"):
        shutil.rmtree(copy / "checkpoints" / step)
    os.remove(copy / "metrics.jsonl")
    run.rename(tmp_path / "moved")
    manifest = os.path.join(str(copy), os.path.relpath(shards, str(run)), "manifest.json")
    before = os.stat(manifest).st_mtime_ns
    resumed = subprocess.run(_train_cmd(config_path, copy), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "built-in corpus" not in resumed.stderr and "prepare" not in resumed.stderr
    assert os.stat(manifest).st_mtime_ns == before
    got = read_losses(copy)
    assert sorted(got) == [4, 5, 6, 7, 8] and all(got[s] == want[s] for s in got)

    step_dir = copy / "checkpoints" / "8"
    assert tokenizer_dir(copy) == copy and tokenizer_dir(step_dir) == step_dir / "tokenizer"
    spec = importlib.util.spec_from_file_location("generate_cli", os.path.join(ROOT, "generate.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    capsys.readouterr()
    assert cli.main(["--checkpoint", str(step_dir), "--prompt", "def main(",
                     "--max_new_tokens", "3", "--dtype", "float32"]) == 0
    out = capsys.readouterr()
    # (8 steps of training make a poor writer: the completion is spaces, the point is the
    # tokenizer found in the step directory)
    assert out.out.endswith("\n") and "3 tokens in" in out.err, out
    hf = tmp_path / "hf"
    assert convert_main(["export", str(copy), str(hf)]) == 0
    assert (hf / "tokenizer.json").read_text() == tok_json
    from transformers import AutoTokenizer

    text = "def main(argv):\n    return 0\n"
    ours = tokenizer_lib.load_tokenizer(str(copy))
    assert AutoTokenizer.from_pretrained(str(hf))(text)["input_ids"] == ours.encode(text).ids
