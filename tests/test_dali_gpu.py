"""The GPU paths of gpuprune.dali (issue 22): each found by reading DALI's code, fixed or refused,
and run here on a GPU. Every test is marked ``gpu`` and skips without CUDA (and without DALI).

* ``GpuArraySource``: gathered on the GPU on its own stream, which DALI uses for its copy (DALI
  honours ``cuda_stream`` for torch tensors); data written on the current stream before an epoch
  reaches that epoch; a subclass's ``gather`` is what DALI gets; the stream is made on first use,
  not when the graph is defined.
* ``"mixed"`` decoding: ``verify`` and the search for a bad file decode with the GPU decoder too.
* ids on the Pruner's device: a Pruner on another GPU than the pipeline's ``device_id`` is refused.
* no host synchronisation of gpuprune's own in a steady ``next()``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from nvidia.dali import types  # noqa: E402

import gpuprune as gp  # noqa: E402
from gpuprune.dali import (BadSampleError, FileSource, GpuArraySource, LastBatchPolicy,  # noqa: E402
                           PrunedDALIIterator, build_iterator, build_pipeline)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
N = 2000


@pytest.fixture(scope="module")
def data(fmnist_images):
    x = fmnist_images(N)
    y = (np.arange(N) % 10).astype(np.int64)
    return x, y


def chw(x):
    return x.transpose(0, 3, 1, 2).astype(np.float32)


def normalize_graph(images, labels):
    from nvidia.dali import fn
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=[0.0],
                                    std=[1.0]), labels


def planned(ids, bs):
    ids = ids.cpu().numpy().astype(np.int64)
    return [ids[i:i + bs] for i in range(0, len(ids), bs)]


@pytest.mark.parametrize("kind", ["torch", "cupy"])
@pytest.mark.parametrize("policy", ["ucb", "uniform"])
def test_gpu_array_source_gathers_on_the_device(data, kind, policy):
    x, y = data
    if kind == "cupy":
        cp = pytest.importorskip("cupy")
        xs, ys = cp.asarray(x), cp.asarray(y)
    else:
        xs, ys = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    pruner = gp.Pruner(N, keep=0.3, policy=policy, seed=0, device="cuda")
    source = GpuArraySource(xs, ys, layouts=("HWC", None))
    it = build_iterator(pruner, source, normalize_graph, batch_size=64, device_id=0)
    for epoch in range(3):
        it.set_epoch(epoch)
        got = []
        for (b,) in it:
            assert b["data"].is_cuda and b["index"].is_cuda and b["weight"].is_cuda
            idx = b["index"].cpu().numpy()
            assert np.array_equal(b["label"].cpu().numpy(), y[idx])
            assert np.array_equal(b["data"].cpu().numpy(), chw(x[idx]))
            pruner.observe(b["index"], (b["index"] % 7).float())
            got.append(idx)
            if epoch == 1 and len(got) == 2:
                break
        want = planned(pruner.plan(epoch).indices, 64)
        assert len(got) == (2 if epoch == 1 else len(want))
        assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_gpu_array_source_stream_is_dalis_and_orders_after_writes(data):
    """The batches are gathered on the source's own stream, the one DALI copies on (its handle is
    what DALI reads), and that stream waits for the current stream at each epoch: arrays rewritten
    in place on the current stream just before set_epoch reach that epoch."""
    x, y = data
    xs, ys = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    source = GpuArraySource(xs, ys, layouts=("HWC", None))
    pipe = build_pipeline(source, normalize_graph, batch_size=128, device_id=0)
    assert source._stream._stream is None              # defining the graph made no CUDA stream
    pruner = gp.Pruner(N, keep=0.5, policy="uniform", seed=1, device="cuda")
    it = PrunedDALIIterator(pipe, ["data", "label"], pruner=pruner, source=source)
    stream = source._stream.stream
    assert stream.cuda_stream == source._stream.cuda_stream != torch.cuda.current_stream().cuda_stream
    for epoch in range(3):
        torch.cuda._sleep(50_000_000)                  # keep the current stream busy, then write
        xs.add_(1)
        ys.add_(100)
        it.set_epoch(epoch)
        for (b,) in it:
            idx = b["index"].cpu().numpy()
            assert np.array_equal(b["label"].cpu().numpy(), y[idx] + 100 * (epoch + 1))
            want = ((x[idx].astype(np.int64) + epoch + 1) % 256).astype(np.uint8)
            assert np.array_equal(b["data"].cpu().numpy(), chw(want))


def test_gpu_array_source_subclass_gather_is_what_dali_gets(data):
    """A subclass's gather (CUDA ids in, on the source's stream) makes every batch."""
    x, y = data
    calls = []

    class Tagged(GpuArraySource):
        def gather(self, ids, epoch):
            calls.append((ids.device.type, torch.cuda.current_stream().cuda_stream))
            images, labels = super().gather(ids, epoch)
            return images, labels + 1000 * (epoch + 1)

    source = Tagged(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda(), layouts=("HWC", None))
    pruner = gp.Pruner(N, keep=0.2, policy="uniform", seed=2, device="cuda")
    it = build_iterator(pruner, source, normalize_graph, batch_size=100, device_id=0)
    for epoch in range(2):
        it.set_epoch(epoch)
        for (b,) in it:
            idx = b["index"].cpu().numpy()
            assert np.array_equal(b["label"].cpu().numpy(), y[idx] + 1000 * (epoch + 1))
    assert calls and all(c == ("cuda", source._stream.cuda_stream) for c in calls)


def test_a_pruner_on_another_gpu_than_the_pipeline_is_refused():
    """Batches come out on the pipeline's device_id, ids on the Pruner's device: observe needs both
    on one device, so a mismatch is refused when the iterator is made (before DALI builds on the
    other device, which need not exist), naming both and the fix."""
    source = FileSource(["unused.png"] * N, decoder=None)
    pipe = build_pipeline(source, batch_size=8, device_id=1)
    with pytest.raises(ValueError, match=r"device_id=1 .* cuda:0.*device='cuda:1'"):
        PrunedDALIIterator(pipe, ["data"], pruner=gp.Pruner(N, device="cuda:0"), source=source)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_a_pipeline_on_gpu_1_without_set_device(data):
    """device_id=1 without torch.cuda.set_device(1): the Pruner made on cuda:1 serves ids there,
    and observe takes them with the losses computed on the batch's device."""
    x, y = data
    assert torch.cuda.current_device() == 0
    pruner = gp.Pruner(N, keep=0.3, policy="ucb", seed=0, device="cuda:1")
    source = GpuArraySource(torch.from_numpy(x).cuda(1), torch.from_numpy(y).cuda(1),
                            layouts=("HWC", None))
    it = build_iterator(pruner, source, normalize_graph, batch_size=64, device_id=1)
    for epoch in range(2):
        it.set_epoch(epoch)
        for (b,) in it:
            assert b["data"].device == b["index"].device == torch.device("cuda", 1)
            pruner.observe(b["index"], b["data"].mean(dim=(1, 2, 3)))


def _jpeg(img) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.repeat(img, 3, axis=-1)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_jpegs(x, folder, n=64) -> list[str]:
    pytest.importorskip("PIL")
    paths = [str(folder / f"{i}.jpg") for i in range(n)]
    for i, path in enumerate(paths):
        open(path, "wb").write(_jpeg(x[i]))
    return paths


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_mixed_decoding_checks_files_with_the_gpu_decoder(data, tmp_path, monkeypatch, on_error):
    """With "mixed" decoding, verify decodes each file with the GPU decoder (0.2: the CPU one,
    so a file nvJPEG rejects passed the check); a truncated JPEG is named or skipped."""
    import nvidia.dali.experimental.dynamic as ndd
    x, y = data
    paths = write_jpegs(x, tmp_path)
    bad = 37
    (tmp_path / f"{bad}.jpg").write_bytes(_jpeg(x[bad])[:300])
    devices = []
    real = ndd.decoders.image

    def spy(*args, device=None, **kwargs):
        devices.append(str(device))
        return real(*args, device=device, **kwargs)
    monkeypatch.setattr(ndd.decoders, "image", spy)
    pruner = gp.Pruner(64, policy="full", seed=0, device="cuda")
    source = FileSource(paths, y[:64], on_error=on_error, verify=True)
    it = build_iterator(pruner, source, batch_size=16, device_id=0)
    if on_error == "raise":
        with pytest.raises(BadSampleError, match=f"{bad}.jpg"):
            for _ in it:
                pass
    else:
        seen = [i for (b,) in it for i in b["index"].tolist()]
        assert sorted(seen) == [i for i in range(64) if i != bad]
        assert it.bad_samples == {bad: (paths[bad], "undecodable")}
    assert devices and set(devices) == {"gpu:0"}


def test_mixed_decoding_finds_the_bad_file_after_a_dali_error(data, tmp_path):
    """Without verify, the search after DALI's decoder error decodes on the GPU too."""
    x, y = data
    paths = write_jpegs(x, tmp_path)
    (tmp_path / "20.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    it = build_iterator(gp.Pruner(64, policy="full", seed=0, device="cuda"),
                        FileSource(paths, y[:64]), batch_size=16, device_id=0,
                        last_batch_policy=LastBatchPolicy.PARTIAL)
    with pytest.raises(BadSampleError, match="20.jpg.*sample index 20"):
        for _ in it:
            pass


def test_a_steady_next_makes_no_host_synchronisation(data):
    """gpuprune's part of a steady next() (slicing ids and weights, the batch checks) issues no
    synchronising torch call; DALI's own share_outputs() still waits for its batch (as in
    DALIGenericIterator: docs/dali.md, Limitations)."""
    x, y = data
    pruner = gp.Pruner(N, keep=0.5, policy="infobatch", num_epochs=4, seed=0, device="cuda")
    it = build_iterator(pruner, GpuArraySource(torch.from_numpy(x).cuda(),
                                               torch.from_numpy(y).cuda(), layouts=("HWC", None)),
                        normalize_graph, batch_size=100, device_id=0)
    for epoch in range(2):
        it.set_epoch(epoch)
        first = next(it)[0]
        pruner.observe(first["index"], first["data"].mean(dim=(1, 2, 3)))
        batches = []
        torch.cuda.set_sync_debug_mode("error")      # a synchronising torch call raises
        try:
            with pytest.raises(RuntimeError):           # (the check can fail)
                torch.ones(1, device="cuda").item()
            for (b,) in it:
                batches.append((b["index"], b["data"].mean(dim=(1, 2, 3)), b["weight"]))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len(batches) == len(pruner.plan(epoch)) // 100 - 1 + (len(pruner.plan(epoch)) % 100 > 0)
        for index, loss, _ in batches:
            pruner.observe(index, loss)


def test_gpu_arrays_and_fork_started_workers(data, png_files_small):
    """GPU arrays initialise CUDA before any pipeline exists, so DALI refuses to fork parallel
    workers for a CPU source of the same process, with its own clear error; spawned workers
    work."""
    x, y = data
    GpuArraySource(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda())
    paths, labels = png_files_small
    for method in ("fork", "spawn"):
        pruner = gp.Pruner(len(paths), policy="full", seed=0)
        source = FileSource(paths, labels, output_type=types.GRAY, parallel=True)
        if method == "fork":
            with pytest.raises(RuntimeError, match="Cannot fork a process when the CUDA has been"):
                build_iterator(pruner, source, batch_size=16, py_num_workers=1,
                               py_start_method=method)
        else:
            it = build_iterator(pruner, source, batch_size=16, py_num_workers=1,
                                py_start_method=method)
            assert sorted(i for (b,) in it for i in b["index"].tolist()) == list(range(len(paths)))


@pytest.fixture(scope="module")
def png_files_small(data, tmp_path_factory):
    Image = pytest.importorskip("PIL.Image")
    x, y = data
    root = tmp_path_factory.mktemp("gpu_png")
    paths = []
    for i in range(48):
        paths.append(str(root / f"{i}.png"))
        Image.fromarray(x[i, :, :, 0]).save(paths[-1])
    return paths, y[:48]
