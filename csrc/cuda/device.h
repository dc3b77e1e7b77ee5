// Host-side declarations of the device queries (plain C++: included by the pybind11 module).
#pragma once

#include <cstddef>
#include <string>

namespace fastrec {
namespace cuda {

struct DeviceInfo {
  std::string name;
  int major = 0, minor = 0;
  int multiprocessors = 0;
  std::size_t total_memory = 0;
  int l2_bytes = 0;
  std::size_t smem_per_block_optin = 0;
};

int device_count();              // 0 when there is no driver or no GPU (never throws)
DeviceInfo device_info(int device);
int runtime_version();
int driver_version();            // 0 when there is no driver

}  // namespace cuda
}  // namespace fastrec
