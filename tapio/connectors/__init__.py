"""Connectors: components that end one pipeline and start others (``connectors:`` in pipelines.yaml).

A connector is listed under the exporters of the pipelines it takes from
and under the receivers of those it hands on to. Its ``run`` gets both an
input channel (like an exporter) and an output consumer (like a receiver),
and ends when its input ends.
"""
