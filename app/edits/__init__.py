"""Edits: acting on a job's result (remove neurons, measure what that does, hand back the edited model)."""
