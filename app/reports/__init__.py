"""The report page: a job as a self-contained HTML page for people (``GET /v1/jobs/{id}/report``)."""
