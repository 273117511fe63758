"""Units of work, their storage, and the runners that execute them.

plan.py and unitstore.py hold no Ray: a unit is planned, run and merged the
same way in one process (local.py) or on a Ray cluster (issue 4 adds the
actors and the coordinator around the same functions).
"""
