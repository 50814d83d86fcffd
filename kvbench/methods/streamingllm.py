"""StreamingLLM, attention sinks (Xiao et al., ICLR 2024, arXiv 2309.17453; methods.md §2.5).

Keep the first `sinks` tokens plus the last B - sinks. Defaults are the faithful official behaviour
(mit-han-lab/streaming-llm `kv_cache.py` + `pos_shift`): `mode=online` evicts after every step so the
cache stays at B, and `position_mode=contiguous` gives rolling positions (kept keys re-rotated to their
index in the cache, the next query at position = cache length). `mode=prefill, position_mode=original`
is the KVCache-Factory / kvpress variant (compress once after the prompt, original positions).
B is the prompt's kept budget (Budget.kept), fixed from the prompt length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.methods.sink_recent import SinkRecent


@dataclass
class StreamingLLM(SinkRecent):
    name: ClassVar[str] = "streamingllm"
    source: ClassVar[str] = (
        "Xiao et al. 2024 (arXiv 2309.17453); mit-han-lab/streaming-llm@2e50426 kv_cache.py, pos_shift"
    )
    continuous: ClassVar[bool] = True  # default mode online; per instance False in prefill mode
    position_mode: str = "contiguous"
    sinks: int = 4
    mode: str = "online"
