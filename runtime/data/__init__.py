"""Data: tokenizer, sources, prepare (text/jsonl/csv -> token shards), mmap dataset, rank-sliced sampler.

The flow: `prepare(spec)` reads every `data.sources[]` entry (sources.py), trains or loads the
tokenizer (tokenizer.py), tokenizes documents in parallel into one token shard per source and
split with a document index and, for SFT, a loss mask (shards.py), and writes a manifest. Training
reads the shards memory-mapped (dataset.py) through a deterministic mixture sampler whose order
each data-parallel rank slices (sampler.py).
"""
