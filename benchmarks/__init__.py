"""Benchmarks and studies of vllm-tokenprune (not part of the installed package): run them from
the repository root as modules, ``python -m benchmarks.<name>``; ``benchmarks/README.md`` says
what each one answers, its command and the docs table or JSON it writes."""
