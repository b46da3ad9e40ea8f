"""Evaluation package tests (unique module names across test dirs)."""
