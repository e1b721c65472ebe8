"""The benchmarks behind `dare bench` and `dare load-bench`: the default workload (workload.py), stock transformers
`generate` as the reference (reference.py), one request at a time (single.py), backlogs in batches (batch.py), the
same backlog through vLLM (vllm.py), and open-loop load through the whole pipeline (load.py). No service imports
them."""
