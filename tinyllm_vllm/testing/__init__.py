"""Test harness, not part of the runtime: the fault scenarios, the reliability checks and greedy parity
against the original implementation's goldens. The tests, ``make reliability`` and the GPU parity run
use it; nothing in the package outside ``testing`` imports it."""
