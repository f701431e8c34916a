"""What runs inside a serverless worker: its entry (``handler``), the branch loop
(``loop``, ``branch``), task metrics and the output cache. It imports no backend and
nothing of the client or the planner: a backend's entry point sets the worker up and
calls it."""
