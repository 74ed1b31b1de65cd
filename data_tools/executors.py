"""datatrove's executors running a planned build (:mod:`data_tools.build`): N tokenising tasks, then the manifest.

Two pipelines of one step each: the tokenising tasks (:class:`TokenizeTask`, task ``rank`` runs
:func:`data_tools.shards.build_task`) on ``LocalPipelineExecutor`` (processes on this machine),
``SlurmPipelineExecutor`` (Slurm job arrays) or ``RayPipelineExecutor`` (a Ray cluster), and, depending on them,
one task writing ``manifest.json`` (:class:`WriteManifest`). datatrove's logs, statistics and completion markers
live under ``<out>/.build/``; after a failure the same command resumes: finished tasks are skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.pipeline.base import PipelineStep
from loguru import logger

from data_tools.build import ExecutorOptions
from data_tools.records import SkipLog
from data_tools.shards import BuildConfig, Output, build_task, merge_manifest


class TokenizeTask(PipelineStep):
    """datatrove step: task ``rank`` tokenises its files into its shards and its part manifest."""

    name = "tokenise into WebDataset shards"
    type = "emo-data"

    def __init__(self, config: BuildConfig) -> None:
        super().__init__()
        self.config = config

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in a local worker process (started by a fork server, with a fresh datatrove): its console
        log stays off there too, as in the process that runs the build (``run``)."""
        self.__dict__.update(state)
        if self.config.executor == "local":
            logger.disable("datatrove")

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1):
        if world_size != self.config.tasks:
            raise RuntimeError(f"the plan has {self.config.tasks} tasks, the executor runs {world_size}")
        result = build_task(self.config, rank)
        self.stat_update("documents", value=result.docs)
        self.stat_update("tokens", value=result.tokens)
        self.stat_update("shards", value=len(result.shards))
        self.stat_update("skipped", value=SkipLog.from_dict(result.skipped).total)
        yield from ()


class WriteManifest(PipelineStep):
    """datatrove step (one task, after every :class:`TokenizeTask`): merge the part manifests."""

    name = "write manifest.json"
    type = "emo-data"

    def __init__(self, config: BuildConfig) -> None:
        super().__init__()
        self.config = config

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1):
        merge_manifest(self.config)
        yield from ()


def make_executors(
    config: BuildConfig, options: ExecutorOptions
) -> tuple[PipelineExecutor, PipelineExecutor]:
    """(the tokenising tasks, the manifest task that depends on them) for ``options.kind``."""
    out = Output(config.out)
    tokenize, manifest = [TokenizeTask(config)], [WriteManifest(config)]
    logs, manifest_logs = out.build_url("tokenize"), out.build_url("manifest")
    if options.kind == "local":
        # forkserver, not fork: a fork of a process whose threads hold locks (tokenizers', OpenMP's, a test
        # runner's) can deadlock its workers (seen once in a full test run); they keep quiet (TokenizeTask)
        first = LocalPipelineExecutor(
            tokenize,
            tasks=config.tasks,
            workers=min(options.workers, config.tasks),
            logging_dir=logs,
            start_method="forkserver",
        )
        second = LocalPipelineExecutor(manifest, tasks=1, workers=1, logging_dir=manifest_logs, depends=first)
        return first, second
    if options.kind == "slurm":
        env = options.env_command
        if env is None and sys.prefix != sys.base_prefix:
            env = f"source {Path(sys.prefix) / 'bin' / 'activate'}"
        first = SlurmPipelineExecutor(
            tokenize,
            tasks=config.tasks,
            workers=options.workers,
            time=options.time,
            partition=options.partition,
            cpus_per_task=options.cpus_per_task,
            mem_per_cpu_gb=options.mem_per_cpu_gb,
            job_name=options.job_name,
            env_command=env,
            logging_dir=logs,
        )
        second = SlurmPipelineExecutor(
            manifest,
            tasks=1,
            time="01:00:00",
            partition=options.partition,
            cpus_per_task=1,
            mem_per_cpu_gb=max(options.mem_per_cpu_gb, 4),
            job_name=f"{options.job_name}-manifest",
            env_command=env,
            logging_dir=manifest_logs,
            depends=first,
        )
        return first, second
    from datatrove.executor import RayPipelineExecutor

    kwargs = {"cpus_per_task": options.cpus_per_task, "mem_per_cpu_gb": options.mem_per_cpu_gb}
    first = RayPipelineExecutor(
        tokenize, tasks=config.tasks, workers=options.workers, logging_dir=logs, **kwargs
    )
    second = RayPipelineExecutor(
        manifest, tasks=1, workers=1, logging_dir=manifest_logs, depends=first, **kwargs
    )
    return first, second


def run(config: BuildConfig, options: ExecutorOptions) -> tuple[str, str] | None:
    """Run the build (local, Ray: returns when it is done) or submit it (Slurm: returns the two job ids)."""
    first, second = make_executors(config, options)
    if options.kind == "slurm":
        second.run()  # submits the task array first, then the manifest job depending on it
        return str(first.job_id), str(second.job_id)  # type: ignore[attr-defined]
    if options.kind == "local":
        logger.disable("datatrove")  # its console log would bury ours; errors surface as our one line
    try:
        second.run()
    finally:
        logger.enable("datatrove")
    return None
