"""The jobs domain: a model, an evaluation set and a spec, estimated by a worker."""
