"""What the shell and the engine processes both import, without torch: the request and result
types (`base`) and the messages that cross the socket pair between them (`messages`)."""
