-- AG-UI 1.0 interrupts (docs/agents.md, v2): the interrupts the thread's last run stopped with,
-- JSON, until a run of the thread ends `ok`; the threads API shows them as `interrupted`.
ALTER TABLE threads ADD COLUMN interrupts TEXT;
