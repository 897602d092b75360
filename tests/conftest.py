"""Helpers shared by the test files (they import them from here, never from each other).

- Models: tiny prime-ish MPT configs (`tiny`, HF_CONFIGS for what transformers' native MPT
  expresses, NP_CONFIGS for what only llm-foundry does), random weights, an independent float64
  numpy forward, and transformers' MptForCausalLM with its logits and state dict.
- Training: the environment of subprocess runs, a small prepared corpus (session fixture), a
  config file over it, and readers of a workdir's metrics.jsonl.
- Checkpoints: a toy train state (checkpoint_test and its subprocess).

Subprocess end-to-end tests are marked `slow` (pyproject.toml registers it): the fast lane is
`python3 -m pytest -m "not slow" -n 2 tests`.
"""
import glob
import json
import math
import os
import shutil
import sysconfig
import tempfile
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import erf

from mpt_jax.convert.table import model_shapes
from mpt_jax.data import prepare
from mpt_jax.data import tokenizer as tokenizer_lib
from mpt_jax.model.config import AttnConfig, FFNConfig, MPTConfig

# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
V = 101


def tiny(**kw) -> MPTConfig:
    base = dict(d_model=21, n_heads=3, n_layers=2, vocab_size=V, max_seq_len=32,
                expansion_ratio=4, attn_config=AttnConfig())
    base.update(kw)
    return MPTConfig(**base)


def random_pure(cfg: MPTConfig, seed=0, std=0.25) -> dict:
    """Random params for every leaf: matrices N(0, std), norm weights 1 + N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    pure = {}
    for path, shape in model_shapes(cfg).items():
        if path[-1] == "weight":  # norms
            val = 1.0 + 0.1 * rng.standard_normal(shape)
        elif path[-1] == "bias" or path[-1].endswith("_bias"):
            val = 0.1 * rng.standard_normal(shape)
        else:
            val = std * rng.standard_normal(shape)
        d = pure
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = val.astype(np.float32)
    return pure


# ---------------------------------------------------------------------------------------------
# Independent numpy reference (float64)
# ---------------------------------------------------------------------------------------------
def np_slopes(h, bias_max):
    n = 2 ** math.ceil(math.log2(h))
    m = np.arange(1, n + 1) * bias_max / n
    s = 1.0 / 2.0 ** m
    if n != h:
        s = np.concatenate([s[1::2], s[::2]])[:h]
    return s


def np_norm(x, w, b, eps, rms=False):
    if rms:
        y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    else:
        mu = x.mean(-1, keepdims=True)
        y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    y = y * w
    return y if b is None else y + b


def np_act(name, x):
    if name == "gelu":
        return 0.5 * x * (1 + erf(x / np.sqrt(2)))
    if name == "silu":
        return x / (1 + np.exp(-x))
    return np.maximum(x, 0)


def np_forward(cfg: MPTConfig, pure, ids, mask=None):
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), pure)
    a, eps = cfg.attn_config, cfg.norm_eps
    rms = cfg.norm_type.endswith("rmsnorm")
    B, T = ids.shape
    H, KV, hd = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
    mask = np.ones((B, T), bool) if mask is None else mask.astype(bool)
    x = P["wte"][ids]
    if cfg.use_wpe:
        pos = np.maximum(np.arange(T)[None] - np.cumsum(~mask, 1), 0)
        x = x + P["wpe"][pos]
    x = x * cfg.embedding_fraction + x * (1 - cfg.embedding_fraction)

    def g(tree, *ks):
        for k in ks:
            tree = tree.get(k) if isinstance(tree, dict) else None
            if tree is None:
                return None
        return tree

    blk = P["blocks"]
    scale = a.softmax_scale if a.softmax_scale is not None else 1 / math.sqrt(hd)
    slopes = np_slopes(H, a.alibi_bias_max) if a.alibi else np.zeros(H)
    i_, j_ = np.arange(T)[:, None], np.arange(T)[None, :]
    for l in range(cfg.n_layers):
        L = jax.tree.map(lambda t: t[l], blk)
        h = np_norm(x, L["norm_1"]["weight"], g(L, "norm_1", "bias"), eps, rms)
        qkv = h @ L["attn"]["Wqkv"] + (g(L, "attn", "Wqkv_bias") if not cfg.no_bias else 0)
        if a.clip_qkv is not None:
            qkv = np.clip(qkv, -a.clip_qkv, a.clip_qkv)
        q, k, v = qkv[..., :H * hd], qkv[..., H * hd:(H + KV) * hd], qkv[..., (H + KV) * hd:]
        if a.qk_ln:
            q = np_norm(q, L["attn"]["q_ln"]["weight"], g(L, "attn", "q_ln", "bias"), eps, rms)
            k = np_norm(k, L["attn"]["k_ln"]["weight"], g(L, "attn", "k_ln", "bias"), eps, rms)
        q, k, v = (t.reshape(B, T, -1, hd) for t in (q, k, v))
        if a.qk_gn:
            q = np_norm(q, L["attn"]["q_ln"]["weight"], g(L, "attn", "q_ln", "bias"), eps, rms)
            k = np_norm(k, L["attn"]["k_ln"]["weight"], g(L, "attn", "k_ln", "bias"), eps, rms)
        grp = H // KV
        k, v = k[:, :, np.arange(H) // grp], v[:, :, np.arange(H) // grp]
        s = np.einsum("bihd,bjhd->bhij", q, k) * scale
        s = s + slopes[None, :, None, None] * (j_ - i_)[None, None]
        allowed = (j_ <= i_)[None, None] & mask[:, None, None, :]
        s = np.where(allowed, s, -1e30)  # fully masked (padding) rows: garbage, never compared
        p = np.exp(s - s.max(-1, keepdims=True)) * allowed
        p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
        o = np.einsum("bhij,bjhd->bihd", p, v).reshape(B, T, H * hd)
        o = o @ L["attn"]["out_proj"] + (0 if cfg.no_bias else L["attn"]["out_proj_bias"])
        x = x + o
        h = np_norm(x, L["norm_2"]["weight"], g(L, "norm_2", "bias"), eps, rms)
        f = L["ffn"]
        up = h @ f["up_proj"] + (0 if cfg.no_bias else f["up_proj_bias"])
        if cfg.ffn_config.ffn_type == "mptglu":
            gate = h @ f["gate_proj"] + (0 if cfg.no_bias else f["gate_proj_bias"])
            m = np_act(cfg.ffn_config.ffn_act_fn, gate) * up
        else:
            m = np_act(cfg.ffn_config.ffn_act_fn, up)
        x = x + m @ f["down_proj"] + (0 if cfg.no_bias else f["down_proj_bias"])
    x = np_norm(x, P["norm_f"]["weight"], g(P, "norm_f", "bias"), eps, rms)
    w = P["wte"] if cfg.tie_word_embeddings else P["lm_head"]
    logits = x @ w.T
    return logits if cfg.logit_scale is None else logits * cfg.logit_scale_value


def _ids_mask(B=2, T=11, pad=4, seed=0):
    ids = np.random.default_rng(seed).integers(0, V, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :pad] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# transformers' MptForCausalLM
# ---------------------------------------------------------------------------------------------
def hf_model(cfg: MPTConfig, seed=0, std=0.25):
    torch = pytest.importorskip("torch")
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(seed)
    hf = MptForCausalLM(MptConfig(**cfg.to_dict("hf"))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim > 1:
                p.normal_(0, std)
            else:
                p.normal_(1.0, 0.1)
    return hf


def hf_logits(hf, ids, mask=None):
    import torch

    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return hf(torch.tensor(ids), **kw).logits.numpy()


def hf_state(hf) -> dict:
    return {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}


HF_CONFIGS = {
    "h3": tiny(),
    "h4": tiny(d_model=28, n_heads=4),
    "h5_clip": tiny(d_model=35, n_heads=5, attn_config=AttnConfig(clip_qkv=0.7)),
    "h6_scale": tiny(d_model=42, n_heads=6, n_layers=3,
                     attn_config=AttnConfig(softmax_scale=0.21)),
}


NP_CONFIGS = {
    "alibi_bias_max_5_h6": tiny(d_model=42, n_heads=6, attn_config=AttnConfig(alibi_bias_max=5)),
    "gqa": tiny(d_model=30, n_heads=6, attn_config=AttnConfig(
        attn_type="grouped_query_attention", kv_n_heads=2)),
    "mqa": tiny(d_model=28, n_heads=4, attn_config=AttnConfig(attn_type="multiquery_attention")),
    "glu_silu_bias": tiny(no_bias=False, ffn_config=FFNConfig(ffn_type="mptglu",
                                                             ffn_act_fn="silu"),
                          expansion_ratio=3),
    "qk_ln_bias_gqa": tiny(d_model=30, n_heads=6, no_bias=False, attn_config=AttnConfig(
        qk_ln=True, attn_type="grouped_query_attention", kv_n_heads=3)),
    "qk_gn_rms": tiny(norm_type="low_precision_rmsnorm", attn_config=AttnConfig(qk_gn=True)),
    "logit_scale_untied": tiny(logit_scale=0.37, tie_word_embeddings=False),
    "logit_scale_inv_sqrt": tiny(logit_scale="inv_sqrt_d_model"),
    "wpe_no_alibi_fraction": tiny(learned_pos_emb=True, embedding_fraction=0.3,
                                  attn_config=AttnConfig(alibi=False)),
}


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocess runs: CPU only, and LLVM at -O0 (halves XLA's compile time of these tiny models;
# not for this process: at -O0 some in-process step and bf16 kernel tests compute otherwise).
FAST_XLA = "--xla_backend_optimization_level=0"


def subprocess_env(n_devices: int | None = None) -> dict:
    flags = FAST_XLA
    if n_devices:
        flags += f" --xla_force_host_platform_device_count={n_devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


# One persistent XLA compilation cache for the whole session (every xdist worker and every
# subprocess it starts): the many runs of one tiny config compile its steps once.
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    if not os.environ.get(_CACHE_ENV):  # (the controller; the workers inherit its choice)
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="mpt_jax_test_xla_cache_")
        os.environ["MPT_JAX_TEST_CACHE_OWNER"] = str(os.getpid())
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if os.environ.get("MPT_JAX_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


def prepare_small_corpus(out_dir: str) -> str:
    """~30 stdlib modules, a 384-token byte-level BPE, document shards: seconds, not a minute."""
    from mpt_jax.data import prepare, tokenizer

    os.makedirs(out_dir, exist_ok=True)
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:40]
    texts = [open(p, errors="replace").read()[:8000] for p in files]
    docs = os.path.join(out_dir, "docs.jsonl")
    with open(docs, "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    tok_path = os.path.join(out_dir, "tokenizer.json")
    tokenizer.train_byte_level_bpe(texts, 384).save(tok_path)
    shards = os.path.join(out_dir, "shards")
    prepare.prepare_dataset([docs], shards, tok_path, seq_len=None, keep_documents=True)
    return shards


def write_test_config(path: str, shards: str | None, **top) -> str:
    """configs/tiny.py shrunk further (prime-ish tiny model, few steps) over `shards`, or over
    the built-in corpus with a BPE of BUILTIN_VOCAB tokens when `shards` is None (prepare it
    small first: `prepare_small_builtin`)."""
    overrides = "\n".join(f"    c.{k} = {v!r}" for k, v in top.items())
    data = (f"c.data.builtin_vocab_size = {BUILTIN_VOCAB}" if shards is None else
            f"c.data = tiny.get_config({shards!r}).data")
    with open(path, "w") as fh:
        fh.write(textwrap.dedent(f'''\
            from configs import tiny

            def get_config():
                c = tiny.get_config()
                {data}
                c.data.eval_fraction = 0.1
                c.data.prefetch = 0
                c.model.d_model, c.model.n_heads, c.model.n_layers = 40, 4, 2
                c.model.max_seq_len = 24
                c.train.seq_len = 24
                c.train.global_batch_size = 8
                c.train.micro_batch_size = 0
                c.train.loss_chunk_size = 8
                c.eval.batch_size = 4
                c.eval.num_batches = 2
                c.optim.warmup_steps = 2
                c.max_steps = 8
                c.log_every = 1
                c.eval_every = 4
                c.checkpoint_every = 3
                c.loss_spike.enabled = False
            '''))
        fh.write(overrides + "\n    return c\n")
    return path


BUILTIN_VOCAB = 384


def prepare_small_builtin(workdir: str, monkeypatch) -> str:
    """The built-in corpus, 40 stdlib files of it, prepared into `workdir`/data as the trainer
    would (a train.py run on that workdir then finds it prepared): seconds, not a minute."""
    from mpt_jax.data import corpus

    files = corpus.stdlib_files()[:40]
    monkeypatch.setattr(corpus, "stdlib_files", lambda: files)
    monkeypatch.setattr(corpus, "_prepare_workers", lambda: 1)
    return corpus.prepare_builtin("python_stdlib", os.path.join(workdir, "data"),
                                  vocab_size=BUILTIN_VOCAB, progress=True)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    return prepare_small_corpus(str(tmp_path_factory.mktemp("corpus")))


def read_train_rows(workdir):
    """{step: the last train-metrics row logged for it} (a rerun after a resume overwrites)."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        for line in fh:
            row = json.loads(line)
            if "loss" in row:
                rows[row["step"]] = row
    return rows


def read_losses(workdir):
    return {step: row["loss"] for step, row in read_train_rows(workdir).items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def toy_train_state(scale, n=64):
    """A train-state-shaped tree ({"step", "params", "opt_state"}) of `scale`-filled arrays."""
    params = {"wte": jnp.full((n, 8), scale, jnp.float32), "blocks": {"w": jnp.arange(6.0) * scale}}
    return {"step": jnp.int32(0), "params": params,
            "opt_state": ({"mu": jax.tree.map(jnp.zeros_like, params)}, jnp.int32(3))}


# ---------------------------------------------------------------------------------------------
# jaxpr walking (kernel counts)
# ---------------------------------------------------------------------------------------------
def all_eqns(jaxpr):
    """Every equation of a jaxpr, recursing into jit, scan, while, cond and shard_map bodies
    (an equation in a loop body counts once)."""
    from jax.extend import core as jcore

    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from all_eqns(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from all_eqns(sub)


def pallas_kernels(jaxpr):
    """The names of the Pallas kernels a jaxpr launches, one per call site."""
    names = []
    for e in all_eqns(jaxpr):
        if e.primitive.name == "pallas_call":  # (newer jax: name_and_src_info)
            info = e.params.get("name_and_src_info")
            names.append(e.params["name"] if info is None else info.name)
    return names


# ---------------------------------------------------------------------------------------------
# grain pipeline sources (data_pipeline_test, finetune_pipeline_test)
# ---------------------------------------------------------------------------------------------
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
         "lambda", "mu"]
PIPELINE_T = 16  # the pipeline tests' seq_len


def make_docs(n, seed, tag, max_words=40):
    rng = np.random.default_rng(seed)
    return [f"{tag}{i} " + " ".join(rng.choice(WORDS, rng.integers(1, max_words)))
            for i in range(n)]


def data_config(sources, **overrides):
    cfg = ml_collections.ConfigDict(dict(
        builtin="", tokenizer="", sources={}, packing=False, eval_fraction=0.0, shuffle=True,
        num_workers=0, prefetch=2, builtin_vocab_size=4096))
    cfg.sources = {name: dict(path=path, weight=weight) for name, (path, weight) in
                   sources.items()}
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer and sources a (200 docs), b (60 docs), c (long docs) in both layouts."""
    root = tmp_path_factory.mktemp("data")
    docs = {"a": make_docs(200, 1, "a"), "b": make_docs(60, 2, "b"),
            "c": make_docs(20, 3, "c", max_words=60)}
    tok_path = str(root / "tokenizer.json")
    all_docs = [d for source_docs in docs.values() for d in source_docs]
    tokenizer_lib.train_byte_level_bpe(all_docs, 320).save(tok_path)
    out = {"tok": tok_path, "docs": docs}
    for name, source_docs in docs.items():
        jsonl = root / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in source_docs))
        for mode in ("seq", "doc"):
            out[f"{name}_{mode}"] = str(root / f"{name}_{mode}")
            prepare.prepare_dataset([str(jsonl)], out[f"{name}_{mode}"], tok_path, seq_len=PIPELINE_T,
                                    keep_documents=mode == "doc", progress=False)
        # finetuning examples: the document's tag and first word prompt the rest (truncated to PIPELINE_T)
        examples = root / f"{name}_examples.jsonl"
        examples.write_text("".join(
            json.dumps({"prompt": " ".join(d.split()[:2]), "response": " " + " ".join(
                d.split()[2:] or ["alpha"])}) + "\n" for d in source_docs))
        out[f"{name}_ex"] = str(root / f"{name}_ex")
        prepare.prepare_dataset([str(examples)], out[f"{name}_ex"], tok_path, seq_len=None,
                                format="prompt_response", max_seq_len=PIPELINE_T, progress=False)
    return out


def take(iterator, n):
    batches = [next(iterator) for _ in range(n)]
    return batches


# ---------------------------------------------------------------------------------------------
# Serving (serve_*_test.py): one tiny checkpoint and one slot-pool shape, so the test files
# share the engine's compiled steps
# ---------------------------------------------------------------------------------------------
SERVE_CFG = tiny(d_model=40, n_heads=4, vocab_size=384, max_seq_len=64)
SERVE_ENGINE = dict(max_batch=4, max_seq_len=64, prefill_chunk=8, top_logprobs=5)


def write_serve_checkpoint(path: str, seed: int = 0) -> str:
    """A tiny HF-layout MPT checkpoint (random weights, safetensors by the name table, no
    torch) with a byte-level BPE of 300 tokens plus ChatML's <|im_start|> / <|im_end|>."""
    from safetensors.numpy import save_file

    from mpt_jax.convert.table import name_table
    from mpt_jax.data import tokenizer as tokenizer_lib

    os.makedirs(path, exist_ok=True)
    pure, tensors = random_pure(SERVE_CFG, seed=seed), {}
    for r in name_table(SERVE_CFG):
        arr = pure
        for k in r.path:
            arr = arr[k]
        for i, key in enumerate(r.keys(SERVE_CFG.n_layers)):
            a = arr[i] if r.stacked else arr
            tensors[key] = np.ascontiguousarray(a.T if r.transpose else a)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    SERVE_CFG.to_json_file(os.path.join(path, "config.json"), form="hf")
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:10]
    tok = tokenizer_lib.train_byte_level_bpe([open(p).read()[:4000] for p in files], 300)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    return path


def left_padded(prompt, length: int):
    """One prompt left-padded to `length`: (ids [1, length], mask [1, length]) int32."""
    ids = np.zeros((1, length), np.int32)
    mask = np.zeros((1, length), np.int32)
    ids[0, length - len(prompt):] = prompt
    mask[0, length - len(prompt):] = 1
    return ids, mask


def slow_engine(engine, monkeypatch, seconds):
    """Each of the serving engine's iterations waits `seconds` first (requests stay in flight
    long enough to be cancelled, disconnected or shut down)."""
    real = engine._iteration

    def slow():
        time.sleep(seconds)
        real()

    monkeypatch.setattr(engine, "_iteration", slow)


def wait_for(cond, timeout=60):
    """Polls `cond` until true; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def stop_at_check(monkeypatch, n: int) -> None:
    """The trainer's stop signal fires at its n-th check (as a SIGTERM arriving then would):
    for stop-and-resume tests. Undone with the monkeypatch (or its context)."""
    from mpt_jax.train import monitor

    class StopAtN(monitor.StopSignal):
        calls = 0

        def any_process(self):
            StopAtN.calls += 1
            return StopAtN.calls == n or super().any_process()

    monkeypatch.setattr(monitor, "StopSignal", StopAtN)
