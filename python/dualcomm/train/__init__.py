"""`dualcomm-train`: the bundled MoE model trained with DualPipe/DualPipeV/1F1B pipelines
and expert parallelism over `dualcomm.Buffer`, on CPU processes it starts itself."""
