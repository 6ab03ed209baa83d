"""Data-pipeline benchmarks on the CPU (engine issue 27): tokenization throughput of `prepare-data` against
`datasets.map` with the same tokenizer, training start-up time and peak RSS on a small and a large prepared
corpus, and the prepared-data loader's tokens/s on one core. `python -m benchmarks.data --help`."""
