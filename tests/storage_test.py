"""gs:// and s3:// paths (mpt_jax/storage.py and its call sites) against real emulators on
127.0.0.1: moto's S3 server and gcp-storage-emulator, each started here on a free port and
stopped after. Nothing leaves the machine."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import read_losses, subprocess_env, write_test_config
from emulators import S3_ENV, free_port, fresh_filesystems, s3_server

# gcsfs >= 2025.10 probes every bucket over gRPC for zonal / hierarchical buckets; an emulator
# speaks only JSON over HTTP, so the probe would wait out a 60 s timeout (read at gcsfs import).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GCS_BUCKET, S3_BUCKET = "mpt-gcs", "mpt-s3"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(k, v)
        import boto3

        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        fresh_filesystems()
        yield endpoint
    fresh_filesystems()


def _emulator_sends_generations():
    """gcp-storage-emulator's media downloads lack GCS's x-goog-generation header; tensorstore
    (orbax's OCDBT manifests) reads an object's generation from it for its conditional writes,
    and fails 'Malformed StorageGeneration' without. Add the headers real GCS sends. (The
    emulator does not enforce ifGenerationMatch either: concurrent writers are not tested.)"""
    from gcp_storage_emulator import server as server_lib
    from gcp_storage_emulator.handlers import objects

    real = objects.download
    if getattr(real, "sends_generations", False):
        return

    def download(request, response, storage, *args, **kwargs):
        real(request, response, storage, *args, **kwargs)
        with contextlib.suppress(Exception):  # a missing object: the 404 stands
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])

    download.sends_generations = True
    objects.download = download
    for _, methods in server_lib.HANDLERS:
        for method, fn in list(methods.items()):
            if fn is real:
                methods[method] = download


@pytest.fixture(scope="module")
def gcs():
    from gcp_storage_emulator.server import create_server

    _emulator_sends_generations()
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", endpoint)
            mp.setenv("TENSORSTORE_GCS_HTTP_URL", endpoint)
            fresh_filesystems()
            yield endpoint
    finally:
        server.stop()
        fresh_filesystems()


@pytest.fixture(params=["local", "gs", "s3"])
def root(request, tmp_path):
    """A fresh directory on each store."""
    if request.param == "local":
        return str(tmp_path)
    request.getfixturevalue("gcs" if request.param == "gs" else "s3")
    bucket = GCS_BUCKET if request.param == "gs" else S3_BUCKET
    return f"{request.param}://{bucket}/{request.node.name.replace('[', '-').rstrip(']')}"


@pytest.mark.slow
def test_file_operations_agree_with_the_local_filesystem(root):
    """The same sequence of operations gives the same answers on gs://, s3:// and local disk
    (the local column is the os module's own behaviour)."""
    from mpt_jax import storage

    sub = storage.join(root, "a")
    storage.makedirs(sub)
    storage.write_atomic(storage.join(sub, "x.json"), '{"k": 1}')
    storage.write_atomic(storage.join(sub, "y.bin"), bytes(range(256)) * 40)
    storage.write_atomic(storage.join(root, "top.txt"), "t")
    storage.write_atomic(storage.join(sub, "x.json"), '{"k": 2}')  # replaced whole
    assert storage.listdir(root) == ["a", "top.txt"]
    assert storage.listdir(sub) == ["x.json", "y.bin"]
    assert storage.listdir(storage.join(root, "absent")) == []
    assert storage.isdir(sub) and not storage.isfile(sub)
    assert storage.isfile(storage.join(sub, "x.json")) and not storage.isdir(
        storage.join(sub, "x.json"))
    assert not storage.exists(storage.join(root, "nope"))
    assert json.loads(storage.read_text(storage.join(sub, "x.json"))) == {"k": 2}
    assert [storage.basename(p) for p in storage.glob(root, "**/*.json")] == ["x.json"]
    with storage.open_file(storage.join(sub, "y.bin"), "rb") as fh:  # a ranged read
        fh.seek(1000)
        assert fh.read(16) == (bytes(range(256)) * 40)[1000:1016]
    assert storage.size(storage.join(sub, "y.bin")) == 10240

    log_path = storage.join(root, "metrics.jsonl")
    log = storage.AppendLog(log_path)
    log.write("1\n")
    log.flush()
    assert storage.read_text(log_path) == "1\n"
    log.write("2\n")
    log.close()
    again = storage.AppendLog(log_path)  # a resumed run continues the file
    again.write("3\n")
    again.close()
    assert storage.read_text(log_path) == "1\n2\n3\n"

    storage.remove(storage.join(root, "top.txt"))
    storage.remove(storage.join(root, "top.txt"))  # already gone: fine
    storage.rmtree(sub)
    assert storage.listdir(root) == ["metrics.jsonl"]


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_missing_bucket_and_object_are_one_line_naming_them(scheme, request):
    from mpt_jax import storage

    request.getfixturevalue("gcs" if scheme == "gs" else "s3")
    bucket = GCS_BUCKET if scheme == "gs" else S3_BUCKET
    for path in (f"{scheme}://no-such-bucket-9/x.json", f"{scheme}://{bucket}/missing.json"):
        with pytest.raises(storage.StorageError) as e:
            storage.read_text(path)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(path) and "no such file" in msg
        assert isinstance(e.value, ValueError)  # what the CLIs print as one line


def test_wrong_endpoint_and_a_server_gone_mid_read_are_one_line(monkeypatch):
    """An endpoint nobody listens on, and an S3 server stopped while a file is half read:
    bounded retries, then one line naming the object (no traceback, no partial result)."""
    from mpt_jax import storage

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: keep the test short
    monkeypatch.setattr(storage, "BACKOFF_S", 0.05)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    fresh_filesystems()
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes(f"s3://{S3_BUCKET}/x.bin")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"s3://{S3_BUCKET}/x.bin")
    assert "connect" in msg.lower() and f"after {storage.RETRIES} attempts" in msg

    data = np.random.default_rng(0).bytes(3 << 20)
    with s3_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        fresh_filesystems()
        import boto3

        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        path = f"s3://{S3_BUCKET}/big.bin"
        storage.write_atomic(path, data)
        fh = storage.open_file(path, "rb", block_size=1 << 20)
        assert fh.read(1 << 20) == data[: 1 << 20]
    with pytest.raises(storage.StorageError) as e, storage.errors(path, "reading"):
        fh.read()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(path + ": reading:")
    fresh_filesystems()


@pytest.mark.slow
def test_a_refused_permission_is_one_line_naming_the_object(monkeypatch, tmp_path, capsys):
    """moto enforcing credentials (in its own process: it reads the setting at import) and
    keys it does not know: reads, writes, listings and a CLI writing there each fail in one
    line naming the object and saying the permission was refused."""
    from conftest import HF_CONFIGS, hf_model

    from mpt_jax import storage
    from mpt_jax.convert.convert import main as convert_main

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "import time; from moto.server import ThreadedMotoServer as S; "
         f"S(ip_address='127.0.0.1', port={port}, verbose=False).start(); time.sleep(300)"],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        for k, v in {**S3_ENV, "AWS_ACCESS_KEY_ID": "unknown", "AWS_MAX_ATTEMPTS": "1",
                     "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        fresh_filesystems()
        deadline = time.time() + 30
        while time.time() < deadline:  # until the server answers
            try:
                storage.listdir(f"s3://{S3_BUCKET}/x")
            except storage.StorageError as e:
                if "permission denied" in str(e):
                    break
            time.sleep(0.2)
        for path, fn in ((f"s3://{S3_BUCKET}/a.bin", storage.read_bytes),
                         (f"s3://{S3_BUCKET}/b.bin", lambda p: storage.write_atomic(p, b"1")),
                         (f"s3://{S3_BUCKET}/d", storage.listdir)):
            with pytest.raises(storage.StorageError) as e:
                fn(path)
            msg = str(e.value)
            assert "\n" not in msg and msg.startswith(path) and "permission denied" in msg, msg
        hf_model(HF_CONFIGS["h3"]).save_pretrained(tmp_path / "hf")
        capsys.readouterr()
        assert convert_main(["import", str(tmp_path / "hf"), f"s3://{S3_BUCKET}/ours"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"s3://{S3_BUCKET}/ours" in err[0], err
        assert "permission denied" in err[0], err
    finally:
        server.kill()
        fresh_filesystems()


def _save_step(manager, step, value):
    from conftest import toy_train_state

    from mpt_jax.train import checkpoint as ckpt_lib

    ckpt_lib.save(manager, step, toy_train_state(value), model_config={"d_model": 8},
                  train_state={"step": step})
    manager.wait_until_finished()


@pytest.mark.parametrize("scheme", ["gs", "s3"])
@pytest.mark.slow
def test_checkpoints_in_a_bucket_commit_last_and_an_unfinished_step_is_ignored(scheme, request):
    """orbax on gs:// and s3:// (tensorstore's gcs / s3 drivers on the emulators): steps save
    and restore; a step whose save stopped before its commit marker is not a step, for us or
    for orbax."""
    import jax
    from conftest import toy_train_state

    from mpt_jax import storage
    from mpt_jax.train import checkpoint as ckpt_lib

    request.getfixturevalue("gcs" if scheme == "gs" else "s3")
    workdir = f"{scheme}://{GCS_BUCKET if scheme == 'gs' else S3_BUCKET}/ckpt-run"
    manager = ckpt_lib.make_manager(workdir, keep=3, async_save=False)
    _save_step(manager, 1, 1.0)
    _save_step(manager, 2, 2.0)
    manager.close()
    root = ckpt_lib.checkpoint_dir(workdir)
    assert ckpt_lib.finished_steps(workdir) == [1, 2]
    assert ckpt_lib.latest_model_config(workdir) == {"d_model": 8}
    # step 2 interrupted mid-write: its items are there, its commit marker is not
    storage.remove(storage.join(root, "2", ckpt_lib.COMMIT_MARKER))
    assert ckpt_lib.finished_steps(workdir) == [1]
    manager = ckpt_lib.make_manager(workdir, keep=3, async_save=False)
    assert manager.latest_step() == 1
    like = toy_train_state(0.0)
    shardings = jax.tree.map(lambda a: a.sharding, like)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
    state, train_state = ckpt_lib.restore(manager, 1, abstract, shardings)
    manager.close()
    assert train_state["step"] == 1
    # orbax removes the unfinished step in the background (cleanup_tmp_directories): wait
    for _ in range(100):
        if "2" not in storage.listdir(root):
            break
        time.sleep(0.1)
    assert storage.listdir(root) == ["1"]
    np.testing.assert_array_equal(state["params"]["blocks"]["w"], np.arange(6.0))


@pytest.mark.parametrize("scheme", ["gs", "s3"])
@pytest.mark.slow
def test_hf_safetensors_in_a_bucket_load_import_and_export_as_transformers_computes(
        scheme, request, tmp_path):
    """load_pretrained and `convert_torch.py import` read a sharded HF directory straight from
    the bucket (ranged reads): logits equal transformers' on the same weights; the import's
    checkpoint, local and in the bucket, loads to the same model; exported from the bucket into
    the bucket and copied back, transformers loads it with the same logits."""
    from conftest import HF_CONFIGS, _ids_mask, hf_logits, hf_model

    from mpt_jax import storage
    from mpt_jax.convert.convert import load_pretrained
    from mpt_jax.convert.convert import main as convert_main

    request.getfixturevalue("gcs" if scheme == "gs" else "s3")
    cfg = HF_CONFIGS["h3"]
    hf = hf_model(cfg)
    local = tmp_path / "hf"
    hf.save_pretrained(local, max_shard_size="20KB")  # several shards and an index
    remote = f"{scheme}://{GCS_BUCKET if scheme == 'gs' else S3_BUCKET}/hf-{scheme}"
    for name in sorted(os.listdir(local)):
        storage.write_atomic(storage.join(remote, name), (local / name).read_bytes())
    assert len(storage.glob(remote, "*.safetensors")) > 1
    ids, mask = _ids_mask()
    real = mask.astype(bool)  # logits at padding positions mean nothing
    want = hf_logits(hf, ids, mask)[real]
    got = np.asarray(load_pretrained(remote)(ids, attention_mask=mask))[real]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    dst = tmp_path / "ours"
    assert convert_main(["import", remote, str(dst)]) == 0
    got = np.asarray(load_pretrained(str(dst))(ids, attention_mask=mask))[real]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    ours = f"{remote}-ours"  # imported into the bucket: params through tensorstore's gcs / s3
    assert convert_main(["import", remote, ours]) == 0
    assert convert_main(["import", remote, ours]) == 1  # never over an existing one
    assert "config.json" in storage.listdir(ours)
    got = np.asarray(load_pretrained(ours)(ids, attention_mask=mask))[real]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)

    import torch
    from transformers import MptForCausalLM

    exported = f"{remote}-exported"
    assert convert_main(["export", ours, exported, "--max_shard_size=0.00002"]) == 0
    assert convert_main(["export", ours, exported]) == 1  # never over an existing one
    back = tmp_path / "back"
    back.mkdir()
    names = storage.listdir(exported)
    assert "config.json" in names and len([n for n in names if n.endswith(".safetensors")]) > 1
    for name in names:
        (back / name).write_bytes(storage.read_bytes(storage.join(exported, name)))
    with torch.no_grad():
        out = MptForCausalLM.from_pretrained(back).eval()(
            torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(out[real], want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("scheme", ["gs", "s3"])
@pytest.mark.slow
def test_peft_adapters_import_and_export_within_a_bucket(scheme, request, tmp_path):
    """A PEFT adapter (made by peft) and its base, both in the bucket: imported into the bucket
    as our LoRA directory, which loads with peft's logits, and exported from there into the
    bucket merged (transformers loads it) and as PEFT's adapter again (peft loads it)."""
    import peft
    import torch
    from conftest import hf_model, tiny
    from transformers import MptForCausalLM

    from mpt_jax import load_pretrained, storage
    from mpt_jax.convert import convert

    request.getfixturevalue("gcs" if scheme == "gs" else "s3")
    bucket = f"{scheme}://{GCS_BUCKET if scheme == 'gs' else S3_BUCKET}/peft-{scheme}"
    hf_model(tiny(d_model=40, n_heads=4, vocab_size=384, max_seq_len=32), seed=5,
             std=0.1).save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(MptForCausalLM.from_pretrained(tmp_path / "base"), peft.LoraConfig(
        r=3, lora_alpha=12, target_modules=["Wqkv", "down_proj"], lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "peft")
    ids = np.random.default_rng(0).integers(0, 384, (2, 13))
    with torch.no_grad():
        want = pm.eval()(torch.tensor(ids)).logits.numpy()
    base = storage.join(bucket, "base")
    for d, remote in ((tmp_path / "base", base), (tmp_path / "peft", storage.join(bucket, "a"))):
        for name in os.listdir(d):
            storage.upload(str(d / name), storage.join(remote, name))
    ours = storage.join(bucket, "ours")
    assert convert.main(["import", storage.join(bucket, "a"), ours, "--base", base]) == 0
    assert json.loads(storage.read_text(storage.join(ours, "lora.json")))["base"] == base
    np.testing.assert_allclose(np.asarray(load_pretrained(ours)(ids)), want, atol=1e-4,
                               rtol=1e-4)

    def fetch(remote):
        local = tmp_path / remote.rsplit("/", 1)[1]
        local.mkdir()
        for name in storage.listdir(remote):
            (local / name).write_bytes(storage.read_bytes(storage.join(remote, name)))
        return local

    merged = storage.join(bucket, "merged")
    assert convert.main(["export", ours, merged, "--merge_lora"]) == 0
    with torch.no_grad():
        got = MptForCausalLM.from_pretrained(fetch(merged)).eval()(torch.tensor(ids)).logits
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4, rtol=1e-4)
    again = storage.join(bucket, "again")
    assert convert.main(["export", ours, again]) == 0
    back = peft.PeftModel.from_pretrained(MptForCausalLM.from_pretrained(tmp_path / "base"),
                                          str(fetch(again))).eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(ids)).logits.numpy(), want, atol=1e-4,
                                   rtol=1e-4)


def test_what_stays_local_is_refused_in_one_line(tmp_path):
    """The built-in demo corpora are prepared on local disk: a bucket workdir for them says so
    (before any network access)."""
    from conftest import data_config

    from mpt_jax.data import pipeline

    cfg = data_config({}, builtin="python_stdlib")
    with pytest.raises(ValueError) as e:
        pipeline.resolve_data(cfg, "gs://b/run")
    msg = str(e.value)
    assert "\n" not in msg and "gs://b/run" in msg and "local disk" in msg, msg


def _store_env(scheme: str, endpoint: str, n_devices: int | None = None) -> dict:
    """A subprocess environment that reaches the emulator the usual way for its store."""
    env = subprocess_env(n_devices)
    env.pop("TENSORSTORE_GCS_HTTP_URL", None)  # storage.py derives it from the emulator host
    if scheme == "gs":
        return {**env, "STORAGE_EMULATOR_HOST": endpoint,
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    return {**env, **S3_ENV, "AWS_ENDPOINT_URL": endpoint}


def _read_remote_losses(workdir: str) -> dict:
    from mpt_jax import storage

    path = storage.join(workdir, "metrics.jsonl")
    if not storage.exists(path):
        return {}
    rows = [json.loads(line) for line in storage.read_text(path).splitlines() if line]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("scheme", ["gs", "s3"])
@pytest.mark.slow
def test_eval_reads_its_checkpoint_data_and_tasks_from_a_bucket(scheme, request, tmp_path):
    """eval.py perplexity over shards prepared into the bucket and icl with its task file,
    datasets and gauntlet there, the checkpoint an HF directory in the bucket, the results
    (JSON, PNG, markdown) written into the bucket: the same JSON as the same evaluation of
    local copies."""
    import random

    import eval_common

    from eval import main
    from mpt_jax import storage
    from mpt_jax.data import prepare

    request.getfixturevalue("gcs" if scheme == "gs" else "s3")
    bucket = f"{scheme}://{GCS_BUCKET if scheme == 'gs' else S3_BUCKET}/eval-{scheme}"
    local_ckpt = eval_common.checkpoint()
    ckpt = storage.join(bucket, "ckpt")
    for name in os.listdir(local_ckpt):
        storage.upload(os.path.join(local_ckpt, name), storage.join(ckpt, name))
    rng = random.Random(5)
    docs = eval_common.write_jsonl(tmp_path / "docs.jsonl", [
        {"text": eval_common.sentence(rng, rng.randint(10, 40))} for _ in range(8)])
    mc = [{"query": eval_common.sentence(rng, 4), "choices": ["a cat", "the dog", "red"],
           "gold": i % 3} for i in range(6)]
    local = tmp_path / "local"
    local.mkdir()
    eval_common.write_jsonl(local / "mc.jsonl", mc)
    (local / "tasks.yaml").write_text("icl_tasks:\n- label: mc\n  dataset_uri: mc.jsonl\n"
                                      "  icl_task_type: multiple_choice\n  num_fewshot: [1]\n")
    (local / "gauntlet.yaml").write_text(
        "eval_gauntlet:\n  weighting: EQUAL\n  subtract_random_baseline: true\n"
        "  rescale_accuracy: true\n  categories:\n  - name: k\n    benchmarks:\n"
        "    - {name: mc, num_fewshot: 1, random_baseline: 0.33}\n")
    for name in ("mc.jsonl", "tasks.yaml", "gauntlet.yaml"):
        storage.upload(str(local / name), storage.join(bucket, "tasks", name))
    prepare.prepare_dataset([docs], str(tmp_path / "shards"), local_ckpt, seq_len=None,
                            keep_documents=True, progress=False)
    shards = storage.join(bucket, "shards")
    prepare.prepare_dataset([docs], shards, local_ckpt, seq_len=None, keep_documents=True,
                            progress=False)

    def evaluate(*argv, into=str(tmp_path)) -> dict:  # the results written into `into`
        out = storage.join(into, f"{argv[0]}.json")
        assert main([*argv, "--dtype", "float32", "--batch_tokens", "1024", "--min_bucket",
                     "128", "--output", out, "--no_progress"]) == 0
        return json.loads(storage.read_text(out))

    want = evaluate("perplexity", "--checkpoint", local_ckpt, "--data",
                    str(tmp_path / "shards"), "--seq_lens", "32")
    got = evaluate("perplexity", "--checkpoint", ckpt, "--data", shards, "--seq_lens", "32",
                   into=bucket)
    assert storage.read_bytes(storage.join(bucket, "perplexity.png"))[:4] == b"\x89PNG"
    assert got["tokens"] == want["tokens"] > 0
    assert got["seq_lens"] == want["seq_lens"]  # the same model on the same tokens
    want = evaluate("icl", "--checkpoint", local_ckpt, "--tasks", str(local / "tasks.yaml"),
                    "--gauntlet", str(local / "gauntlet.yaml"))
    tasks = storage.join(bucket, "tasks")
    got = evaluate("icl", "--checkpoint", ckpt, "--tasks", storage.join(tasks, "tasks.yaml"),
                   "--gauntlet", storage.join(tasks, "gauntlet.yaml"), into=bucket)
    assert "| Category | Benchmark |" in storage.read_text(storage.join(bucket, "icl.md"))
    for key in ("tasks", "gauntlet"):
        assert json.dumps(got[key], sort_keys=True) == json.dumps(
            want[key], sort_keys=True).replace(str(local), tasks)


@pytest.fixture(scope="module")
def local_run(small_corpus, tmp_path_factory):
    """(losses, workdir) of an uninterrupted local run of the test config over the local
    shards."""
    tmp = tmp_path_factory.mktemp("local-run")
    config = write_test_config(str(tmp / "cfg.py"), small_corpus)
    ref = subprocess.run([sys.executable, "train.py", f"--config={config}",
                          f"--workdir={tmp / 'run'}"], check=False, cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    losses = read_losses(str(tmp / "run"))
    assert sorted(losses) == list(range(1, 9))
    return losses, tmp / "run"


def _once_logged(proc, workdir: str, step: int, act) -> None:
    """Calls act() once the run `proc` has logged `step` in its bucket workdir (bounded: 240 s,
    or until the run ends)."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if max(_read_remote_losses(workdir), default=0) >= step:
            act()
            return
        time.sleep(0.2)


@pytest.mark.parametrize("scheme", ["gs", "s3"])
@pytest.mark.slow
def test_a_run_wholly_in_a_bucket_prepares_trains_stops_and_resumes_exactly(
        scheme, request, local_run, small_corpus, tmp_path):
    """Everything in the bucket: the raw JSONL and the tokenizer, `prepare` reading them and
    writing its shards there, train.py reading those shards and writing its workdir there;
    SIGTERM part way, a rerun resumes and logs exactly the losses of an uninterrupted local
    run over the locally prepared shards."""
    import signal

    from mpt_jax import storage
    from mpt_jax.data import prepare

    endpoint = request.getfixturevalue("gcs" if scheme == "gs" else "s3")
    bucket = f"{scheme}://{GCS_BUCKET if scheme == 'gs' else S3_BUCKET}/whole-{scheme}"
    corpus_dir = os.path.dirname(small_corpus)
    raw = storage.join(bucket, "raw")
    storage.upload(os.path.join(corpus_dir, "docs.jsonl"), storage.join(raw, "docs.jsonl"))
    tokenizer = storage.join(bucket, "tokenizer.json")
    storage.upload(os.path.join(corpus_dir, "tokenizer.json"), tokenizer)
    env = _store_env(scheme, endpoint)
    shards = storage.join(bucket, "shards")
    out = subprocess.run([sys.executable, "-m", "mpt_jax.data.prepare",
                          f"--input={raw}", f"--output={shards}",
                          f"--tokenizer={tokenizer}",
                          "--keep_documents"], check=False, cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = prepare.read_manifest(shards)
    assert manifest["records"] == prepare.read_manifest(small_corpus)["records"]
    assert list(manifest["inputs"]) == ["../raw/docs.jsonl"]  # relative within the bucket

    want = local_run[0]
    config_path = write_test_config(str(tmp_path / "cfg.py"), shards)
    workdir = storage.join(bucket, "run")
    cmd = [sys.executable, "train.py", f"--config={config_path}", f"--workdir={workdir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _once_logged(proc, workdir, 2, lambda: proc.send_signal(signal.SIGTERM))
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    stopped_at = max(_read_remote_losses(workdir))
    assert stopped_at < 8 and "signal" in err, "the run finished before the signal arrived"
    again = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _read_remote_losses(workdir) == want  # exactly: same floats

    # Shards deleted under a running job: it stops with one line naming a shard. (Rows of
    # exactly seq_len tokens here, so every step reads records: a document feeds many steps.)
    rows = storage.join(bucket, "rows")
    prepare.prepare_dataset([os.path.join(corpus_dir, "docs.jsonl")], rows, tokenizer,
                            seq_len=24, progress=False)
    rows_run = storage.join(bucket, "rows-run")
    proc = subprocess.Popen(
        [sys.executable, "train.py", f"--config={write_test_config(str(tmp_path / 'r.py'), rows)}",
         f"--workdir={rows_run}", "--config.max_steps=400", "--config.data.packing=false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def delete_shards():
        for name in storage.listdir(rows):
            if name.endswith(prepare.SHARD_SUFFIX):
                storage.remove(storage.join(rows, name))

    _once_logged(proc, rows_run, 3, delete_shards)
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 1 and "error: " in last and rows in last, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.slow
def test_train_with_its_workdir_on_gcs_resumes_exactly(gcs, small_corpus, local_run,
                                                     tmp_path):
    """train.py with --workdir gs://...: checkpoints, metrics.jsonl, TensorBoard events,
    loss.png and the tokenizer land in the bucket; with the later checkpoints gone and the
    last one cut off before its commit marker (a save killed midway), a rerun resumes from the
    last committed step and logs exactly the losses of an uninterrupted local run."""
    from mpt_jax import storage
    from mpt_jax.train import checkpoint as ckpt_lib

    config_path = write_test_config(str(tmp_path / "cfg.py"), small_corpus)  # local_run's
    env = {**subprocess_env(), "STORAGE_EMULATOR_HOST": gcs,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    env.pop("TENSORSTORE_GCS_HTTP_URL", None)  # storage.py derives it from the emulator host

    def train(workdir):
        out = subprocess.run([sys.executable, "train.py", f"--config={config_path}",
                              f"--workdir={workdir}"], check=False, cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]

    want, local = local_run
    workdir = f"gs://{GCS_BUCKET}/train-run"
    train(workdir)
    names = storage.listdir(workdir)
    assert {"checkpoints", "metrics.jsonl", "tb", "loss.png", "tokenizer.json"} <= set(names)
    assert storage.read_bytes(storage.join(workdir, "loss.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    assert storage.listdir(storage.join(workdir, "tb"))
    assert ckpt_lib.finished_steps(workdir) == [3, 6, 8]
    root = ckpt_lib.checkpoint_dir(workdir)
    storage.rmtree(storage.join(root, "8"))
    storage.remove(storage.join(root, "6", ckpt_lib.COMMIT_MARKER))
    assert ckpt_lib.finished_steps(workdir) == [3]
    train(workdir)
    rows = [json.loads(line) for line in
            storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()]
    got = {}
    for row in rows:
        if "loss" in row:
            got[row["step"]] = row["loss"]
    assert [r["step"] for r in rows if "loss" in r] == [*range(1, 9), *range(4, 9)]
    assert got == pytest.approx(want, rel=1e-6)
    assert ckpt_lib.finished_steps(workdir) == [3, 6, 8]

    # the run in the bucket loads, and exports, as the local one (read in place, no staging)
    import torch
    from transformers import MptForCausalLM

    from mpt_jax.convert.convert import load_pretrained
    from mpt_jax.convert.convert import main as convert_main

    ids = np.random.default_rng(0).integers(0, 384, (2, 13))
    local_logits = np.asarray(load_pretrained(str(local))(ids))
    np.testing.assert_allclose(np.asarray(load_pretrained(workdir)(ids)), local_logits,
                               rtol=1e-5, atol=1e-5)
    exported = tmp_path / "exported"
    assert convert_main(["export", workdir, str(exported)]) == 0
    assert (exported / "tokenizer.json").read_text() == storage.read_text(
        storage.join(workdir, "tokenizer.json"))
    hf = MptForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        hf_out = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(hf_out, local_logits, rtol=2e-4, atol=2e-4)

    def generate(checkpoint):
        out = subprocess.run([sys.executable, "generate.py", f"--checkpoint={checkpoint}",
                              "--prompt=def ", "--max_new_tokens=8"], check=False, cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    assert generate(workdir) == generate(str(local))  # greedy: the same weights, same text

    # a finetune whose train.init_from is the export, in a bucket: as from the local copy
    in_bucket = f"gs://{GCS_BUCKET}/exported"
    for name in sorted(os.listdir(exported)):
        storage.write_atomic(storage.join(in_bucket, name), (exported / name).read_bytes())

    def finetune(init_from, out):
        run = subprocess.run([sys.executable, "train.py", f"--config={config_path}",
                              f"--workdir={out}", f"--config.train.init_from={init_from}",
                              "--config.max_steps=3"], check=False, cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return read_losses(str(out))

    assert finetune(in_bucket, tmp_path / "ft-gs") == finetune(exported, tmp_path / "ft-local")


@pytest.mark.slow
def test_two_processes_share_a_gcs_workdir_checkpoint_and_resume(gcs, small_corpus, tmp_path):
    """The multi-host path (two CPU processes, one global mesh) with one gs:// workdir: both
    write their shards of each checkpoint, one commits it; rerun after the last checkpoint is
    gone, they resume from the one before and log the same losses again."""
    import portpicker

    from mpt_jax import storage
    from mpt_jax.train import checkpoint as ckpt_lib

    config_path = write_test_config(str(tmp_path / "cfg.py"), small_corpus, max_steps=4,
                                    eval_every=100, checkpoint_every=2)
    env = {**subprocess_env(n_devices=2), "STORAGE_EMULATOR_HOST": gcs,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    env.pop("TENSORSTORE_GCS_HTTP_URL", None)
    workdir = f"gs://{GCS_BUCKET}/two-process-run"

    def two_processes():
        port = portpicker.pick_unused_port()
        procs = [subprocess.Popen(
            [sys.executable, "train.py", f"--config={config_path}", f"--workdir={workdir}",
             f"--coordinator_address=localhost:{port}", "--num_processes=2",
             f"--process_id={i}", "--config.mesh.data=2"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
        errs = [p.communicate(timeout=400)[1] for p in procs]
        for p, err in zip(procs, errs):
            assert p.returncode == 0, err[-3000:]

    def losses():
        rows = [json.loads(line) for line in
                storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    two_processes()
    first = losses()
    assert sorted(first) == [1, 2, 3, 4]
    assert ckpt_lib.finished_steps(workdir) == [2, 4]
    root = ckpt_lib.checkpoint_dir(workdir)
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(
        storage.listdir(storage.join(root, "4", "params")))
    storage.rmtree(storage.join(root, "4"))
    storage.remove(storage.join(workdir, "metrics.jsonl"))
    two_processes()
    assert losses() == {3: first[3], 4: first[4]}
    train_state = json.loads(storage.read_text(storage.join(root, "4", "train_state",
                                                            "metadata")))
    assert len(train_state["data_states"]) == 2
