/* A stand-in for the CUDA driver library: answers the five calls gpu_device() makes. */
#include <stdlib.h>
#include <string.h>
static int env_int(const char *name, int fallback) { const char *v = getenv(name); return v ? atoi(v) : fallback; }
int cuInit(unsigned flags) { (void)flags; return env_int("FAKE_CUDA_INIT", 0); }
int cuDeviceGet(int *dev, int ordinal) { *dev = ordinal; return ordinal < env_int("FAKE_CUDA_COUNT", 1) ? 0 : 101; }
int cuDeviceGetName(char *name, int len, int dev) {
  (void)dev; const char *n = getenv("FAKE_CUDA_NAME"); strncpy(name, n ? n : "Tesla T4", len); return 0; }
int cuDeviceGetAttribute(int *value, int attribute, int dev) {
  (void)dev; *value = attribute == 75 ? env_int("FAKE_CUDA_MAJOR", 7) : env_int("FAKE_CUDA_MINOR", 5); return 0; }
int cuGetErrorName(int code, const char **name) {
  *name = code == 100 ? "CUDA_ERROR_NO_DEVICE" : code == 101 ? "CUDA_ERROR_INVALID_DEVICE" : "CUDA_ERROR_UNKNOWN";
  return 0; }
