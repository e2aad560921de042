"""Shared pytest configuration."""

pytest_plugins = ["redis_fixture"]
