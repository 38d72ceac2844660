"""store: the spool of received files and the SQLite state machine every stage reads and writes."""
