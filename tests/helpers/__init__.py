"""Helpers shared by the test modules: tiny checkpoints, recipes, PEFT/torch references, parallel runs.

A test module imports these (`from tests.helpers.hf_tiny import make_hf_model`), never another test
module (tests/test_layout.py checks it).
"""
