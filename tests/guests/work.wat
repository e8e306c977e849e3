;; Healthy but not trivial: a few hundred microseconds of arithmetic per
;; call, then `x-work: done`. Used to check that a loaded machine does not
;; make the deadline kill real work.
(module
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x-work")
  (data (i32.const 16) "done")
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_request") (result i32)
    (local $i i32) (local $acc i32)
    (loop $spin
      (local.set $acc (i32.add (i32.mul (local.get $acc) (i32.const 31)) (local.get $i)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $spin (i32.lt_u (local.get $i) (i32.const 300000))))
    ;; keep $acc alive so the loop is not optimised away
    (i32.store (i32.const 32) (local.get $acc))
    (drop (call $header_set (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 16) (i32.const 4)))
    i32.const 0))
