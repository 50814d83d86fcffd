"""`kvbench run`'s engine options end to end on the tiny saved model: --decode (recorded in every row, part of
the protocol fingerprint except for sequential, whose rows are engine-v1's), --prefill-chunk (fingerprinted),
--device-map auto (accelerate; on a CPU-only machine everything lands on the CPU), peak memory (CUDA only)."""

from __future__ import annotations

import pytest
import torch

from kvbench import runner
from kvbench.errors import InputError
from kvbench.results import store


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_rows(tmp_path, model_dir, data_dir, **options):
    opts = runner.RunOptions(model=str(model_dir), methods=('fullkv', 'snapkv', 'h2o'), ratios=[0.3],
                             tasks=("multifieldqa_en",),
                             data_dir=data_dir, limit=2, results=tmp_path, device="cpu", **options)
    runner.run(opts, log=lambda _: None)
    return store.load_all_rows(tmp_path)


def test_decode_modes_and_fingerprints(tmp_path, tiny_model_dir, tiny_data_dir):
    seq = run_rows(tmp_path / "seq", tiny_model_dir, tiny_data_dir, decode="sequential")
    bat = run_rows(tmp_path / "bat", tiny_model_dir, tiny_data_dir, decode="batched")
    chunked = run_rows(tmp_path / "chunk", tiny_model_dir, tiny_data_dir, decode="sequential", prefill_chunk=16)
    mapped = run_rows(tmp_path / "map", tiny_model_dir, tiny_data_dir, decode="sequential", device_map="auto")
    assert len(seq) == len(bat) == len(chunked) == len(mapped) == 6
    assert {r["decode"] for r in seq} == {"sequential"} and {r["decode"] for r in bat} == {"batched"}
    fps = [{r["protocol_fp"] for r in rows} for rows in (seq, bat, chunked, mapped)]
    assert all(len(fp) == 1 for fp in fps)
    assert fps[0] != fps[1] and fps[0] != fps[2]  # batched and chunked rows never mix with sequential ones
    assert fps[3] == fps[0]  # where the weights live does not change the arithmetic on one CPU
    key = lambda r: (r["method"], r["_id"])
    by_seq, by_map = {key(r): r for r in seq}, {key(r): r for r in mapped}
    assert all(by_seq[k]["prediction"] == by_map[k]["prediction"] for k in by_seq)
    for row in seq + bat:
        assert row["peak_memory_bytes"] is None  # CUDA only
        assert row["cache_bytes_allocated"] >= row["cache_bytes"] > 0


def test_engine_options_are_validated_before_anything_is_written(tmp_path, tiny_model_dir, tiny_data_dir):
    for options, flag in (({"decode": "parallel"}, "--decode"), ({"prefill_chunk": -1}, "--prefill-chunk"),
                          ({"device_map": "balanced"}, "--device-map")):
        with pytest.raises(InputError, match=flag.lstrip("-").replace("-", "[-_]")):
            run_rows(tmp_path / "bad", tiny_model_dir, tiny_data_dir, **options)
        assert not (tmp_path / "bad").exists()
