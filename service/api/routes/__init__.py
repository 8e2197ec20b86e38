"""HTTP routers: health and index, data plane (classify, profiles), Open Inference Protocol v2, admin,
metrics."""
