"""Plumbing every app shares; imports no app of this project."""
