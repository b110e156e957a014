"""Small modules and helpers for the frontend tests."""
