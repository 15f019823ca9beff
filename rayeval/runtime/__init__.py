"""The runtime every sharded job shares (evaluation, generation, judging): how it runs
(:class:`Execution`), the actor skeleton (:class:`ShardActor`) and the runner (:func:`run_sharded`)."""

from rayeval.runtime.execution import EXEC_KEYS, HF_KEYS, Execution, default_cpu_cores
from rayeval.runtime.sharded import (ShardActor, crash_only, digest, read_rows, run_sharded, shard_file, write_atomic,
                                     write_parquet)

__all__ = ["EXEC_KEYS", "HF_KEYS", "Execution", "ShardActor", "crash_only", "default_cpu_cores", "read_rows",
           "run_sharded", "shard_file", "write_atomic", "digest", "write_parquet"]
