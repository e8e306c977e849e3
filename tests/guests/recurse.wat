;; Hostile: unbounded recursion (stack overflow).
(module
  (memory (export "memory") 1)
  (func $down (param i32) (result i32)
    (call $down (i32.add (local.get 0) (i32.const 1))))
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_request") (result i32) (call $down (i32.const 0))))
