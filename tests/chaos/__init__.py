"""Chaos, hostile input and soak harness for the loop."""
