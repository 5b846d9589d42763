"""Helpers shared by test modules (imported as ``tests.helpers.*``; test modules never import each other)."""
