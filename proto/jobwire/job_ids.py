"""Job ids that fit the id pattern but that no new job may take.

One definition for both sides of the gRPC wall: the service refuses them in CreateJob
(`service/domain/validation.py`), and the bridge refuses them in an AuroraCloud task,
which would create a job, before the service does, so the 400 names the task. Neither
imports the other; both import `jobwire`.
"""

from __future__ import annotations

# The id of log lines that name no job: a job of that id would take them all.
UNKNOWN_JOB = "UNKNOWN"
# URL dot segments: browsers and HTTP clients resolve them away, so a job's callback
# URL or dashboard page would reach another path.
DOT_SEGMENTS = (".", "..")
NOT_A_NEW_JOB_ID = (*DOT_SEGMENTS, UNKNOWN_JOB)
