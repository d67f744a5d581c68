"""Exporters: the store's health signals where teams already look (Prometheus, TensorBoard, W&B).

Each reads the store off the training thread through :mod:`healthwatch.exporters.source`, the
one module that holds their store reads. Imports here stay lazy: prometheus-client, TensorBoard
and W&B are loaded only by the exporter that needs them.
"""
