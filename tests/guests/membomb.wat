;; Hostile: grows memory 1 MiB at a time until refused, then traps.
(module
  (memory (export "memory") 1)
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_request") (result i32)
    (loop $more
      (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1))
        (then unreachable))
      (br $more))
    i32.const 0))
