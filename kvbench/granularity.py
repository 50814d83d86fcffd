"""The heads a compressed cache is stored per (methods-2 §1.6).

kv_head: one kept set per KV head, as the model stores its cache; query_head: one per query head, the KV entries
repeated to the H_q query heads first (KVCache-Factory's default), g = H_q / H_kv times the entries. Torch-free so
that recipes can be read and checked without the engine."""

GRANULARITIES = ("kv_head", "query_head")
