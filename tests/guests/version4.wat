;; Built for a future ABI: must be refused at load with a clear message.
(module
  (memory (export "memory") 1)
  (func (export "cistern_abi_version") (result i32) i32.const 4)
  (func (export "on_request") (result i32) i32.const 0))
