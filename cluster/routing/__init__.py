"""Placement: which worker serves a request (`router`), priced by the policies (`policies`) and the
workers' cache churn (`churn`). Plain Python over the index, no Ray: the service's router actors
and the trace simulator run the same code."""
