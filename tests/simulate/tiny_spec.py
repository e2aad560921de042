"""The small workload spec the ``loragate simulate`` command tests run (6 adapters, 10 req/s,
20 s); the ``spec_file`` fixture (conftest.py) writes it to a file."""

from __future__ import annotations

SPEC = """
name: tiny
seed: 5
duration_s: 20
adapters: {count: 6, ranks: {8: 0.5, 32: 0.5}, popularity: zipf}
arrivals: {process: poisson, rate_rps: 10}
lengths: {prompt: 64, output: {kind: uniform, min: 8, max: 40}}
"""
