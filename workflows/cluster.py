"""The cluster a run is planned for (`thinkbroad plan`, the check in `thinkbroad run`): its node kinds with their CPUs,
GPUs, GPU memory and host memory, from command-line flags, a Ray cluster-launcher YAML, the connected Ray cluster, or
this machine. GPU and instance facts come from hardware/gpu.py.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from hardware.cpu import cpu_info
from hardware.gpu import GPUS, INSTANCES, GpuKind, kind_from_name, local_gpus
from workflows.config import read_yaml

GiB = 2**30


class PlanError(ValueError):
    """A cluster description or data set the planner cannot read; the message names the file or flag and the fix."""


@dataclass(frozen=True)
class NodeGroup:
    name: str
    count: int  # nodes of this kind the cluster can have
    cpus: float
    gpus: int
    gpu: GpuKind | None = None  # None: kind unknown
    gpu_memory_gib: float | None = None  # None: unknown (memory is then not checked)
    memory_gib: float | None = None  # host memory
    held: int | None = None  # nodes kept all the time (autoscaler min_workers); None = all `count`


@dataclass(frozen=True)
class Cluster:
    source: str
    groups: tuple[NodeGroup, ...]
    notes: tuple[str, ...] = ()

    @property
    def gpu_group(self) -> NodeGroup | None:
        """The GPU node kind (the one with the most GPUs per node when there are several)."""
        return max((g for g in self.groups if g.gpus), key=lambda g: g.gpus, default=None)

    @property
    def gpus(self) -> int:
        return sum(g.count * g.gpus for g in self.groups)

    @property
    def cpus(self) -> float:
        return sum(g.count * g.cpus for g in self.groups)

    @property
    def node_cpus(self) -> float:
        return max((g.cpus for g in self.groups), default=0)

    @property
    def cpu_memory_gib(self) -> float | None:
        """Host memory of the node CPU work runs on (the largest)."""
        known = [g.memory_gib for g in self.groups if g.memory_gib]
        return max(known) if known else None

    def held_gpus(self, used: int) -> int:
        """GPUs paid for while a stage uses `used` of them: whole nodes, at least the ones always held."""
        g = self.gpu_group
        if g is None:
            return 0
        held = g.count if g.held is None else g.held
        return max(math.ceil(used / g.gpus), held) * g.gpus

    def describe(self) -> str:
        parts = []
        for g in self.groups:
            what = f"{g.gpus} x {g.gpu.name if g.gpu else 'GPU'} {g.gpu_memory_gib:g} GiB" if g.gpus and g.gpu_memory_gib \
                else f"{g.gpus} GPUs (memory unknown)" if g.gpus else "no GPU"
            count = f"{g.count}" if g.held is None or g.held == g.count else f"{g.held}-{g.count}"
            ram = f", {g.memory_gib:.0f} GiB RAM" if g.memory_gib else ""
            parts.append(f"{count} x {g.name} ({what}, {g.cpus:g} CPUs{ram})")
        return f"{' + '.join(parts)} [{self.source}]"


def cluster_from_flags(nodes: int, gpus_per_node: int, gpu_memory_gb: float | None, gpu_type: str | None = None,
                       cpus_per_node: float | None = None) -> Cluster:
    """--nodes/--gpus-per-node/--gpu-memory-gb[/--gpu-type]: a static cluster of identical GPU nodes."""
    kind, notes = _kind_for(gpu_type, gpu_memory_gb, "--gpu-type")
    memory = gpu_memory_gb or (kind.memory_gib if kind else None)
    if gpus_per_node and memory is None:
        raise PlanError("--gpus-per-node needs --gpu-memory-gb (or --gpu-type, one of " + ", ".join(GPUS) + ")")
    cpus = cpus_per_node if cpus_per_node is not None else 12 * gpus_per_node or cpu_info().cores
    if cpus_per_node is None and gpus_per_node:
        notes += (f"CPUs per node not given: {cpus:g} assumed (12 per GPU; --cpus-per-node to change)",)
    group = NodeGroup("node", nodes, cpus, gpus_per_node, kind, memory)
    return Cluster(f"--nodes {nodes} --gpus-per-node {gpus_per_node}" + (f" --gpu-memory-gb {gpu_memory_gb:g}" if gpu_memory_gb else ""),
                   (group,), notes)


def _kind_for(gpu_type: str | None, memory_gib: float | None, where: str) -> tuple[GpuKind | None, tuple[str, ...]]:
    """The GPU kind named, else the slowest known kind of that memory size (stated), else None."""
    if gpu_type:
        if gpu_type not in GPUS:
            raise PlanError(f"{where} {gpu_type!r}: not a GPU kind the planner knows; one of {', '.join(GPUS)}")
        return GPUS[gpu_type], ()
    if memory_gib is None:
        return None, ()
    same = [g for g in GPUS.values() if abs(g.memory_gib - memory_gib) < 1]
    if not same:
        return None, (f"no known GPU kind has {memory_gib:g} GiB: times on GPUs are not estimated (give --gpu-type)",)
    slowest = min(same, key=lambda g: g.bf16_tflops)
    note = (f"GPU kind not given: timed as {slowest.name}, the slowest {memory_gib:g} GiB kind known "
            f"({', '.join(g.name for g in same)}); --gpu-type to change",) if len(same) > 1 else ()
    return slowest, note


def cluster_from_yaml(path: str | Path) -> Cluster:
    """A Ray cluster-launcher YAML (cluster.yaml, or ~/ray_bootstrap_config.yaml on a launched head node): each
    node type with its resources, its instance type's GPUs and memory (hardware/gpu.py) and min/max workers."""
    path = Path(path)
    raw = read_yaml(path, PlanError, "cluster file")
    types = (raw or {}).get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise PlanError(f"{path}: no available_node_types; expected a Ray cluster-launcher config (see cluster.yaml)")
    head, cap = raw.get("head_node_type"), raw.get("max_workers")
    groups, notes = [], []
    for name, spec in types.items():
        resources = spec.get("resources") or {}
        instance = (spec.get("node_config") or {}).get("InstanceType")
        known = INSTANCES.get(instance)
        gpus = int(resources.get("GPU", known.gpus if known else 0))
        kind = GPUS[known.gpu] if known and gpus else None
        if gpus and kind is None:
            notes.append(f"{path}: node type {name}: instance type {instance!r} is not in hardware/gpu.py INSTANCES; its "
                         "GPU memory is unknown (add it there, or plan with --nodes/--gpus-per-node/--gpu-memory-gb)")
        cpus = float(resources.get("CPU", known.cpus if known else 0))
        if name == head:
            count = held = 1
        else:
            count = int(spec.get("max_workers", cap or 0))
            count = min(count, cap) if cap is not None else count
            held = int(spec.get("min_workers", 0))
        groups.append(NodeGroup(name + (f" {instance}" if instance else ""), count, cpus, gpus, kind,
                                kind.memory_gib if kind else None, known.memory_gib if known else None, held))
    return Cluster(str(path), tuple(groups), tuple(notes))


def cluster_from_ray() -> Cluster:
    """The connected Ray cluster's live nodes (`ray job submit` sets RAY_ADDRESS); GPU memory from the accelerator type
    Ray reports, unknown where the type does not say it (a plain "A100" is 40 or 80 GB)."""
    import ray

    from hardware.runtime import ensure_ray

    ensure_ray()
    groups: dict[tuple, int] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        accel = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), "")
        key = (res.get("CPU", 0), int(res.get("GPU", 0)), accel, res.get("memory", 0) / GiB)  # the RAM Ray gives tasks
        groups[key] = groups.get(key, 0) + 1
    out = []
    for (cpus, gpus, accel, mem), n in groups.items():
        kind = kind_from_name(accel) if gpus else None
        out.append(NodeGroup(accel or "node", n, cpus, gpus, kind, kind.memory_gib if kind else None, mem or None))
    notes = tuple(f"Ray reports GPU type {g.name!r}: its memory is unknown, so GPU memory is not checked (plan with "
                  "--gpu-memory-gb, or `thinkbroad run --cluster cluster.yaml`)" for g in out if g.gpus and g.gpu is None)
    return Cluster(f"Ray cluster at {os.environ.get('RAY_ADDRESS')}", tuple(out), notes)


def this_machine() -> Cluster:
    """This machine: its cores, memory and (through nvidia-smi) GPUs."""
    cores = cpu_info().cores
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    gpus = local_gpus()
    kind = kind_from_name(gpus[0].name, gpus[0].memory_gib) if gpus else None
    name = gpus[0].name if gpus else "this machine"
    return Cluster("this machine", (NodeGroup(name, 1, cores, len(gpus), kind, gpus[0].memory_gib if gpus else None, ram),))


BOOTSTRAP = Path("~/ray_bootstrap_config.yaml")  # what the cluster launcher leaves on the head node


def default_cluster() -> Cluster:
    """Inside a Ray job (RAY_ADDRESS): the launcher's config on the head node when there (the most the autoscaler
    can add), else the live nodes; otherwise this machine."""
    if os.environ.get("RAY_ADDRESS"):
        boot = BOOTSTRAP.expanduser()
        return cluster_from_yaml(boot) if boot.exists() else cluster_from_ray()
    return this_machine()
