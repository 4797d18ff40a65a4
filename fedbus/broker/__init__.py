"""Embedded and managed MQTT brokers."""
