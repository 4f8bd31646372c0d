"""Run orchestration shared by the stages: runtime, preflight, distributed, exact resume, lineage."""
