"""Extensions: services the runtime starts before any pipeline and stops after them all.

An extension's ``run`` hands its service to the runtime through
``task_status.started(value)`` (the `storage` extension hands the open
`tapio.storage.Storage`) and holds it until cancelled.
"""
