-- The ready set by phase. Agents take some phases only; a claim walking one
-- index over every ready task had to step over all the ready work of other
-- phases (a million queued tasks nobody online takes made each claim take a
-- second). A claim now reads the head of each phase it takes and merges them.
CREATE INDEX tasks_ready_phase ON tasks (phase, priority DESC, seq) WHERE status = 'pending' AND unmet_deps = 0;
DROP INDEX tasks_ready;
