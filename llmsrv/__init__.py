"""llmsrv: LLM chat requests over NATS, answered predictably."""

__version__ = "0.1.0"
