"""jaxlora against transformers + PEFT: LoRA training speed on the same device (not part of the package).

    spec.py            what is measured: `BenchSpec`, the presets and suites, the architectures
                       (presets/<name>/config.json), the random batches
    timing.py          timed windows of steps and their summary
    jaxlora_worker.py  one framework's training run, in its own process
    peft_worker.py
    harness.py         spawns the workers, adds FLOPs and MFU, prints the table
    results/           JSON reports, each with the command that produced it

`scripts/benchmark.py` is the command line.
"""
