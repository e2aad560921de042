"""Whole-deployment what-if runs in virtual time: twin replicas behind the gateway's routing.

from loragate.simulate import SimulationConfig, run_simulation
from loragate.workload import Workload, load_spec

result = run_simulation(Workload(load_spec("workload/zipf-200.yaml")),
                        SimulationConfig(replicas=4, profile="fast", policy="loragate"))
result.summary["ttft_s"]["p99"], result.summary["starved"]
"""

from loragate.simulate.config import ReplicaEngineSettings, SimulationConfig
from loragate.simulate.records import RecordWriter, SimRecord
from loragate.simulate.runner import Simulation, SimulationResult, run_simulation

__all__ = [
    "RecordWriter",
    "ReplicaEngineSettings",
    "SimRecord",
    "Simulation",
    "SimulationConfig",
    "SimulationResult",
    "run_simulation",
]
